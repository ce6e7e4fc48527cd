//! The agent's own tmpfs at the volume root.
//!
//! Generations are directories of one filesystem so that running catalog
//! pods see new ones (docs/csi.md), which makes the page size a property of
//! the root's mount, not of a generation. A host's `/dev/shm` is mounted
//! `huge=never`; the agent cannot change that superblock without changing
//! every other user of `/dev/shm`. So on a fresh node (an empty root) the
//! agent mounts a tmpfs of its own at the root, `huge=within_size` by
//! default: every file then gets 2 MiB pages where it covers them (and
//! large folios below that), never beyond its size, so nothing is wasted;
//! first touch costs ~10x less per GiB and writes into it are faster
//! (docs/benchmarks.md). The mount outlives the agent (it is the node copy);
//! a restarted agent finds it and uses it. A root that already holds
//! generations is never hidden under a new mount. In a container the root
//! is a bind mount of the host's directory (a hostPath volume): that is not
//! a filesystem of ours, so the tmpfs goes on top of it.

use std::fs;
use std::io;
use std::path::Path;

use zerocopy_api::format::{LOCK_FILE, STAGING_DIR};

use crate::mount;

/// Whether the agent mounts its own tmpfs at the root.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RootTmpfsMode {
    /// Mount one when the root is empty and not a mount point already, and
    /// this process may mount; otherwise use the root as it is.
    Auto,
    /// Never mount at the root.
    Off,
}

/// What [`ensure`] found or did, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootTmpfs {
    /// A tmpfs was mounted at the root now.
    Mounted {
        /// Its superblock options as passed to mount(2).
        options: String,
    },
    /// A whole filesystem is mounted at the root already (an earlier
    /// agent's tmpfs, or one the node's admin made): used as it is.
    Existing {
        /// Its filesystem type.
        fs_type: String,
        /// Its superblock options (`size=…,huge=…`).
        super_options: String,
    },
    /// Left as it is, and why.
    Skipped(String),
}

/// Size and page options of the root tmpfs.
#[derive(Debug, Clone)]
pub struct RootTmpfsOptions {
    /// tmpfs `size=` (bytes with k/m/g suffix, or a percentage of RAM).
    pub size: String,
    /// Mount `huge=within_size` (else `huge=never`).
    pub huge_pages: bool,
}

impl RootTmpfsOptions {
    fn mount_options(&self) -> String {
        let huge = if self.huge_pages { "within_size" } else { "never" };
        format!("size={},mode=0755,huge={huge}", self.size)
    }
}

/// Mounts the agent's tmpfs at `root` when `mode` is auto and the root is
/// empty (creating it), or reports why not. Errors only when the mount
/// itself was attempted and failed in a way that needs the user's attention
/// (a bad `size`).
pub fn ensure(root: &Path, mode: RootTmpfsMode, options: &RootTmpfsOptions) -> io::Result<RootTmpfs> {
    if mode == RootTmpfsMode::Off {
        return Ok(RootTmpfs::Skipped("--root-tmpfs off".into()));
    }
    // A bind of a directory of another filesystem (in a container: the
    // hostPath volume of `/dev/shm/zerocopy`) is the directory, not a mount
    // of ours: the tmpfs goes on top of it, and through the volume's
    // Bidirectional propagation onto the host's directory.
    if let Some(existing) = mount::mount_at(root)?.filter(|m| m.root == Path::new("/")) {
        return Ok(RootTmpfs::Existing {
            fs_type: existing.fs_type,
            super_options: existing.super_options,
        });
    }
    if !nix::unistd::geteuid().is_root() {
        return Ok(RootTmpfs::Skipped(
            "not running as root (mounting needs CAP_SYS_ADMIN)".into(),
        ));
    }
    match fs::symlink_metadata(root) {
        Ok(meta) if meta.file_type().is_symlink() => {
            return Ok(RootTmpfs::Skipped("the root is a symlink".into()));
        }
        Ok(_) => {
            if let Some(entry) = first_foreign_entry(root)? {
                return Ok(RootTmpfs::Skipped(format!(
                    "the root already holds {entry} (generations from before are never hidden under a new mount; \
                     an emptied root, e.g. after a node restart, gets the tmpfs)"
                )));
            }
            if lock_is_held(root) {
                return Ok(RootTmpfs::Skipped("another agent holds the root's lock".into()));
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(root)?;
        }
        Err(e) => return Err(e),
    }
    let opts = options.mount_options();
    match mount::mount_tmpfs_with(root, &opts) {
        Ok(()) => Ok(RootTmpfs::Mounted { options: opts }),
        Err(e) if e.raw_os_error() == Some(nix::libc::EPERM) => Ok(RootTmpfs::Skipped(format!("mount refused: {e}"))),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("mounting a tmpfs ({opts}) at {}: {e}", root.display()),
        )),
    }
}

/// The first entry of `root` other than an earlier agent's lock file and an
/// empty staging directory.
fn first_foreign_entry(root: &Path) -> io::Result<Option<String>> {
    for entry in fs::read_dir(root)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name == LOCK_FILE {
            continue;
        }
        if name == STAGING_DIR && fs::read_dir(entry.path())?.next().is_none() {
            continue;
        }
        return Ok(Some(format!("`{name}`")));
    }
    Ok(None)
}

/// True when some process holds the flock on `<root>/.lock`.
fn lock_is_held(root: &Path) -> bool {
    use nix::fcntl::{Flock, FlockArg};
    let Ok(file) = fs::File::open(root.join(LOCK_FILE)) else {
        return false;
    };
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(_released_on_drop) => false,
        Err((_, errno)) => errno == nix::errno::Errno::EWOULDBLOCK,
    }
}

/// True when the filesystem holding `path` allocates transparent huge pages
/// for files (`huge=within_size` or `huge=always`), judged by its mount
/// options; whether the kernel grants them is [`crate::hugepages::probe`]'s.
pub fn gives_huge_pages(path: &Path) -> bool {
    mount::mount_containing(path)
        .ok()
        .flatten()
        .is_some_and(|m| m.fs_type == "tmpfs" && huge_option_allocates(&m.super_options))
}

fn huge_option_allocates(super_options: &str) -> bool {
    super_options
        .split(',')
        .any(|o| o == "huge=within_size" || o == "huge=always")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_allocating_huge_options_count() {
        assert!(huge_option_allocates("rw,size=1024k,huge=within_size"));
        assert!(huge_option_allocates("rw,huge=always"));
        assert!(!huge_option_allocates("rw,huge=advise"));
        assert!(!huge_option_allocates("rw,size=10k"));
        assert!(!huge_option_allocates("rw,huge=never"));
    }

    #[test]
    fn mount_options_name_size_and_pages() {
        let o = RootTmpfsOptions {
            size: "50%".into(),
            huge_pages: true,
        };
        assert_eq!(o.mount_options(), "size=50%,mode=0755,huge=within_size");
        let o = RootTmpfsOptions {
            size: "8g".into(),
            huge_pages: false,
        };
        assert_eq!(o.mount_options(), "size=8g,mode=0755,huge=never");
    }

    #[test]
    fn a_root_with_generations_is_foreign_but_leftover_bookkeeping_is_not() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(first_foreign_entry(dir.path()).unwrap(), None);
        fs::write(dir.path().join(LOCK_FILE), b"agent").unwrap();
        fs::create_dir(dir.path().join(STAGING_DIR)).unwrap();
        assert_eq!(first_foreign_entry(dir.path()).unwrap(), None);
        fs::write(dir.path().join(STAGING_DIR).join("x"), b"").unwrap();
        assert!(first_foreign_entry(dir.path()).unwrap().is_some());
        fs::remove_file(dir.path().join(STAGING_DIR).join("x")).unwrap();
        fs::create_dir(dir.path().join("default")).unwrap();
        assert_eq!(first_foreign_entry(dir.path()).unwrap(), Some("`default`".into()));
    }
}
