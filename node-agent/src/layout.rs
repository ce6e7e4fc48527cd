//! The volume root on a node: where generations live, what is complete, and
//! how fills in progress and superseded generations are cleaned.
//!
//! ```text
//! <root>/<namespace>/<wrapper>/<generation>/manifest.json …
//! <root>/.staging/…            fills in progress, never visible to readers
//! ```

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use zerocopy_api::format::{is_generation_name, MANIFEST_FILE, STAGING_DIR};
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
                remove_path(&path)?;
                removed += 1;
            }
        }
        fs::create_dir_all(&staging)?;
        for g in self.generations()? {
            if g.manifest.is_none() {
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
        let _ = fs::remove_dir(&wrapper); // only succeeds when empty
        let _ = fs::remove_dir(self.root.join(&g.namespace));
        Ok(())
    }
}

/// Processes (pid list) that map or hold open a file under `dir`, read from
/// `/proc/<pid>/maps` and `/proc/<pid>/fd`. Processes in other mount
/// namespaces see other paths; the CSI ledger covers those.
pub fn processes_using(dir: &Path) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let prefix = format!("{}/", dir.display());
    let mut pids = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let proc_dir = entry.path();
        let maps_hit = fs::read_to_string(proc_dir.join("maps")).is_ok_and(|maps| maps.contains(&prefix));
        let fd_hit = maps_hit
            || fs::read_dir(proc_dir.join("fd")).is_ok_and(|fds| {
                fds.flatten()
                    .any(|fd| fs::read_link(fd.path()).is_ok_and(|t| t.starts_with(dir)))
            });
        if fd_hit {
            pids.push(pid);
        }
    }
    pids
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
