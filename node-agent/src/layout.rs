//! The volume root on a node: where generations live, what is complete, and
//! how fills in progress and superseded generations are cleaned.
//!
//! ```text
//! <root>/<namespace>/<wrapper>/<generation>/manifest.json …
//! <root>/<namespace>/<wrapper>/current -> <generation>   the newest Ready one
//! <root>/.staging/…            fills in progress, never visible to readers
//! ```

use std::fs;
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use zerocopy_api::format::{is_generation_name, CURRENT_LINK, LOCAL_NAMESPACE, LOCK_FILE, MANIFEST_FILE, STAGING_DIR};
use zerocopy_api::manifest::Manifest;

use crate::mount;

/// A generation directory found on disk.
#[derive(Debug, Clone)]
pub struct GenerationEntry {
    /// Wrapper namespace.
    pub namespace: String,
    /// Wrapper name.
    pub name: String,
    /// Generation digest.
    pub generation: String,
    /// The directory.
    pub path: PathBuf,
    /// Present when complete; `None` for an incomplete or unreadable one.
    pub manifest: Option<Manifest>,
    /// Backed by its own tmpfs mount.
    pub mounted: bool,
    /// Last modification of the manifest, seconds since the epoch (LRU order).
    pub published_at: u64,
}

/// Why a volume root cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RootError {
    /// The root is a symlink: whoever made it chose where fills land.
    #[error(
        "volume root {0} is a symlink; refusing to fill through it (remove it, or point --root at the real directory)"
    )]
    Symlink(PathBuf),
    /// The root is not a directory.
    #[error("volume root {0} exists and is not a directory; remove it or choose another --root")]
    NotADirectory(PathBuf),
    /// Someone else owns the root, so its manifests cannot be trusted.
    #[error("volume root {path} is owned by uid {owner}, not by this agent's uid {me}: its contents could have been planted (manifests are trusted as verified); remove it or choose another --root")]
    ForeignOwner {
        /// The root.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// This process's effective uid.
        me: u32,
    },
    /// Others may write below the root.
    #[error("volume root {path} has mode {mode:o}: group or others may write into it and plant generations; run `chmod 755 {path}` or choose another --root")]
    Writable {
        /// The root.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Another agent or standalone run holds the root.
    #[error("volume root {path} is in use by {holder}: two agents on one root would destroy each other's fills; stop it, wait for it to finish, or use another --root")]
    Locked {
        /// The root.
        path: PathBuf,
        /// What the lock file says about its holder.
        holder: String,
    },
    /// Creating or inspecting the root failed.
    #[error("preparing volume root {path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

/// The exclusive hold on a volume root; released when dropped (or when the
/// process dies, as flock locks are).
#[derive(Debug)]
pub struct RootLock {
    _lock: Flock<fs::File>,
}

/// Handle on a node's volume root.
#[derive(Debug, Clone)]
pub struct VolumeRoot {
    root: PathBuf,
}

impl VolumeRoot {
    /// The root directory; created on first use.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The root path.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// `<root>/<ns>/<name>`
    pub fn wrapper_dir(&self, namespace: &str, name: &str) -> PathBuf {
        self.root.join(namespace).join(name)
    }

    /// `<root>/<ns>/<name>/<generation>`
    pub fn generation_dir(&self, namespace: &str, name: &str, generation: &str) -> PathBuf {
        self.wrapper_dir(namespace, name).join(generation)
    }

    /// `<root>/.staging`
    pub fn staging_dir(&self) -> PathBuf {
        self.root.join(STAGING_DIR)
    }

    /// Creates the root (mode 0755, owned by this process's user) or checks
    /// an existing one: not a symlink, owned by this user, not writable by
    /// group or others. Everything below it is trusted as this agent's own
    /// work (a manifest means "verified"), so nobody else may write there.
    pub fn prepare(&self) -> Result<(), RootError> {
        let io_err = |source| RootError::Io {
            path: self.root.clone(),
            source,
        };
        if let Some(parent) = self.root.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).map_err(io_err)?;
        }
        match fs::DirBuilder::new().mode(0o755).create(&self.root) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err(e)),
        }
        let meta = fs::symlink_metadata(&self.root).map_err(io_err)?;
        if meta.file_type().is_symlink() {
            return Err(RootError::Symlink(self.root.clone()));
        }
        if !meta.is_dir() {
            return Err(RootError::NotADirectory(self.root.clone()));
        }
        let me = nix::unistd::geteuid().as_raw();
        if meta.uid() != me {
            return Err(RootError::ForeignOwner {
                path: self.root.clone(),
                owner: meta.uid(),
                me,
            });
        }
        if meta.mode() & 0o022 != 0 {
            return Err(RootError::Writable {
                path: self.root.clone(),
                mode: meta.mode() & 0o7777,
            });
        }
        Ok(())
    }

    /// Takes the root for this process alone (flock on `<root>/.lock`),
    /// recording `holder` in the file so a second agent can say who has it.
    pub fn lock(&self, holder: &str) -> Result<RootLock, RootError> {
        let path = self.root.join(LOCK_FILE);
        let io_err = |source| RootError::Io {
            path: path.clone(),
            source,
        };
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(io_err)?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                return Err(RootError::Locked {
                    path: self.root.clone(),
                    holder: if holder.is_empty() {
                        "another process".into()
                    } else {
                        holder.to_string()
                    },
                });
            }
            Err((_, errno)) => return Err(io_err(io::Error::from(errno))),
        };
        lock.set_len(0).map_err(io_err)?;
        lock.rewind().map_err(io_err)?;
        writeln!(lock, "pid {} ({holder})", std::process::id()).map_err(io_err)?;
        Ok(RootLock { _lock: lock })
    }

    /// Points `<wrapper>/current` at `generation` (a relative symlink, so it
    /// resolves inside any mount of the namespace directory), replacing the
    /// old pointer atomically: a reader sees the old or the new one.
    pub fn set_current(&self, namespace: &str, name: &str, generation: &str) -> io::Result<()> {
        let dir = self.wrapper_dir(namespace, name);
        let link = dir.join(CURRENT_LINK);
        if fs::read_link(&link).is_ok_and(|t| t == Path::new(generation)) {
            return Ok(());
        }
        let tmp = dir.join(format!(".{CURRENT_LINK}.{}", std::process::id()));
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(generation, &tmp)?;
        fs::rename(&tmp, &link)
    }

    /// Reads a complete generation's manifest, if the generation is complete.
    pub fn read_manifest(&self, namespace: &str, name: &str, generation: &str) -> Option<Manifest> {
        let bytes = fs::read(self.generation_dir(namespace, name, generation).join(MANIFEST_FILE)).ok()?;
        Manifest::from_json(&bytes).ok()
    }

    /// Removes everything a crashed fill left: mounts under `.staging` and
    /// its files, and generation directories without a manifest. Returns how
    /// many leftovers were removed.
    pub fn clean_leftovers(&self) -> io::Result<usize> {
        fs::create_dir_all(&self.root)?;
        let staging = self.staging_dir();
        let mut removed = 0;
        for m in mount::mounts_under(&staging)? {
            mount::unmount_lazy(&m)?;
            removed += 1;
        }
        if staging.exists() {
            for entry in fs::read_dir(&staging)? {
                let path = entry?.path();
                // Python's from_model() stages its own exports here.
                if file_name(&path).is_some_and(|n| n.starts_with(&format!("{LOCAL_NAMESPACE}."))) {
                    continue;
                }
                remove_path(&path)?;
                removed += 1;
            }
        }
        fs::create_dir_all(&staging)?;
        for g in self.generations()? {
            if g.manifest.is_none() && g.namespace != LOCAL_NAMESPACE {
                if g.mounted {
                    mount::unmount_lazy(&g.path)?;
                }
                remove_path(&g.path)?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Every generation directory under the root, complete or not, sorted.
    pub fn generations(&self) -> io::Result<Vec<GenerationEntry>> {
        let mounted: Vec<PathBuf> = mount::mounts_under(&self.root)?;
        let mut out = Vec::new();
        for ns in read_dirs(&self.root)? {
            let Some(namespace) = file_name(&ns) else {
                continue;
            };
            if namespace.starts_with('.') {
                continue;
            }
            for wrapper in read_dirs(&ns)? {
                let Some(name) = file_name(&wrapper) else {
                    continue;
                };
                for gen in read_dirs(&wrapper)? {
                    let Some(generation) = file_name(&gen) else {
                        continue;
                    };
                    if !is_generation_name(&generation) {
                        continue;
                    }
                    let manifest_path = gen.join(MANIFEST_FILE);
                    let manifest = fs::read(&manifest_path).ok().and_then(|b| Manifest::from_json(&b).ok());
                    let published_at = fs::metadata(&manifest_path)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .map_or(0, |d| d.as_secs());
                    out.push(GenerationEntry {
                        namespace: namespace.clone(),
                        name: name.clone(),
                        generation,
                        mounted: mounted.contains(&gen),
                        path: gen,
                        manifest,
                        published_at,
                    });
                }
            }
        }
        out.sort_by(|a, b| (&a.namespace, &a.name, &a.generation).cmp(&(&b.namespace, &b.name, &b.generation)));
        Ok(out)
    }

    /// Bytes held by complete generations.
    pub fn used_bytes(&self) -> io::Result<u64> {
        Ok(self
            .generations()?
            .iter()
            .filter_map(|g| g.manifest.as_ref())
            .map(|m| m.total_bytes)
            .sum())
    }

    /// Removes a generation: its directory vanishes at once (rename or
    /// unmount); processes that still map its files keep their pages until
    /// they exit. Empty wrapper and namespace directories are removed too.
    pub fn remove_generation(&self, g: &GenerationEntry) -> io::Result<()> {
        if g.mounted {
            mount::unmount_lazy(&g.path)?;
            fs::remove_dir(&g.path)?;
        } else {
            let trash = self
                .staging_dir()
                .join(format!("removed-{}-{}-{}", g.namespace, g.name, g.generation));
            fs::create_dir_all(self.staging_dir())?;
            fs::rename(&g.path, &trash)?;
            fs::remove_dir_all(&trash)?;
        }
        let wrapper = self.wrapper_dir(&g.namespace, &g.name);
        let link = wrapper.join(CURRENT_LINK);
        if fs::read_link(&link).is_ok_and(|t| t == Path::new(&g.generation)) {
            let _ = fs::remove_file(&link);
        }
        let _ = fs::remove_dir(&wrapper); // only succeeds when empty
                                          // The namespace directory stays: a catalog mount of the namespace is
                                          // a bind of it, and a new directory would not be seen through it.
        Ok(())
    }
}

/// Other processes (pid list) that map or hold open a file under `dir`, or
/// the directory itself, read from `/proc/<pid>/maps` and `/proc/<pid>/fd`.
///
/// Files are matched by device and inode, not by path: a pod sees a
/// generation through its own mount namespace (a catalog or volume mount at
/// `/mnt/models/…`), so its maps show a path the agent never sees. Processes
/// in other PID namespaces are not listed in this `/proc`; the CSI ledger
/// covers pods there. This process itself is left out: the agent maps no
/// generation, and the files it holds are short reads (a manifest, a blob a
/// peer copies), which must not keep a generation nobody wants.
pub fn processes_using(dir: &Path) -> Vec<u32> {
    processes_using_each(&[dir]).pop().unwrap_or_default()
}

/// [`processes_using`] for several directories, in one pass over `/proc`:
/// the users of each, in the order given.
pub fn processes_using_each(dirs: &[&Path]) -> Vec<Vec<u32>> {
    let mut users = vec![Vec::new(); dirs.len()];
    let owner: std::collections::HashMap<(u64, u64), usize> = dirs
        .iter()
        .enumerate()
        .flat_map(|(i, d)| file_ids(d).into_iter().map(move |id| (id, i)))
        .collect();
    if owner.is_empty() {
        return users;
    }
    let Ok(entries) = fs::read_dir("/proc") else {
        return users;
    };
    let me = std::process::id();
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let proc_dir = entry.path();
        let mut hit = std::collections::BTreeSet::new();
        if let Ok(maps) = fs::read_to_string(proc_dir.join("maps")) {
            hit.extend(maps.lines().filter_map(mapped_file).filter_map(|id| owner.get(&id)));
        }
        if let Ok(fds) = fs::read_dir(proc_dir.join("fd")) {
            // `stat` through the fd link reaches the open file in any mount
            // namespace; sockets, pipes and the like (no path) are skipped.
            hit.extend(
                fds.flatten()
                    .filter(|fd| fs::read_link(fd.path()).is_ok_and(|t| t.is_absolute()))
                    .filter_map(|fd| fs::metadata(fd.path()).ok())
                    .filter_map(|m| owner.get(&(m.dev(), m.ino()))),
            );
        }
        for &i in hit {
            users[i].push(pid);
        }
    }
    users
}

/// (device, inode) of `dir` and of everything below it.
fn file_ids(dir: &Path) -> std::collections::HashSet<(u64, u64)> {
    let mut ids = std::collections::HashSet::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(p) = todo.pop() {
        let Ok(meta) = fs::symlink_metadata(&p) else {
            continue;
        };
        ids.insert((meta.dev(), meta.ino()));
        if meta.is_dir() {
            todo.extend(fs::read_dir(&p).into_iter().flatten().flatten().map(|e| e.path()));
        }
    }
    ids
}

/// (device, inode) of the file a `/proc/<pid>/maps` line maps, if any
/// (`address perms offset major:minor inode [path]`, numbers in hex but the
/// inode in decimal; inode 0 is anonymous memory).
fn mapped_file(line: &str) -> Option<(u64, u64)> {
    let mut fields = line.split_ascii_whitespace();
    let dev = fields.nth(3)?;
    let ino: u64 = fields.next()?.parse().ok()?;
    if ino == 0 {
        return None;
    }
    let (major, minor) = dev.split_once(':')?;
    let (major, minor) = (
        u32::from_str_radix(major, 16).ok()?,
        u32::from_str_radix(minor, 16).ok()?,
    );
    Some((libc::makedev(major, minor), ino))
}

fn read_dirs(dir: &Path) -> io::Result<Vec<PathBuf>> {
    match fs::read_dir(dir) {
        Ok(rd) => {
            let mut v: Vec<PathBuf> = rd
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect();
            v.sort();
            Ok(v)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

fn file_name(p: &Path) -> Option<String> {
    p.file_name()?.to_str().map(str::to_string)
}

fn remove_path(p: &Path) -> io::Result<()> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_lines_name_device_and_inode() {
        let line = "7f3a2c000000-7f3a2c100000 r--s 00000000 00:2d 1234   /mnt/models/m/g/w.safetensors (deleted)";
        assert_eq!(mapped_file(line), Some((libc::makedev(0, 0x2d), 1234)));
        assert_eq!(mapped_file("7f3a2c000000-7f3a2c100000 rw-p 00000000 00:00 0 "), None);
        assert_eq!(
            mapped_file("55d0-55d1 r-xp 00000000 fd:01 99 /usr/bin/x"),
            Some((libc::makedev(0xfd, 1), 99))
        );
    }

    #[test]
    fn a_process_holding_a_file_is_a_user_and_this_process_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let gen = dir.path().join("g");
        fs::create_dir(&gen).unwrap();
        fs::write(gen.join("w.safetensors"), b"weights").unwrap();
        let _mine = fs::File::open(gen.join("w.safetensors")).unwrap();
        assert_eq!(
            processes_using(&gen),
            Vec::<u32>::new(),
            "the agent's own reads keep nothing"
        );
        let mut other = std::process::Command::new("sleep")
            .arg("30")
            .stdin(fs::File::open(gen.join("w.safetensors")).unwrap())
            .spawn()
            .unwrap();
        assert_eq!(processes_using(&gen), vec![other.id()]);
        other.kill().unwrap();
        other.wait().unwrap();
        assert_eq!(processes_using(&gen), Vec::<u32>::new());
    }
}
