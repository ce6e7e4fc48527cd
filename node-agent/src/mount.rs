//! The few mount operations the agent needs, and a reader of
//! `/proc/self/mountinfo` so state is checked against the kernel, not assumed.

use std::io;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// Mounts a fresh tmpfs of `size_bytes` at `target` (mode 0755, nosuid,
/// nodev), `huge=within_size` or `huge=never`: said explicitly, so a
/// generation's page size does not depend on the kernel's default.
pub fn mount_tmpfs(target: &Path, size_bytes: u64, huge_pages: bool) -> io::Result<()> {
    let huge = if huge_pages { "within_size" } else { "never" };
    mount_tmpfs_with(target, &format!("size={size_bytes},mode=0755,huge={huge}"))
}

/// Mounts a fresh tmpfs at `target` (nosuid, nodev) with these superblock options.
pub fn mount_tmpfs_with(target: &Path, options: &str) -> io::Result<()> {
    mount(
        Some("zerocopy"),
        target,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(options),
    )
    .map_err(io::Error::from)
}

/// Makes `source` visible at `target` as a read-only, nosuid, nodev bind mount.
///
/// A bind mount appears atomically with all of its content, which is what
/// makes publishing a generation all-or-nothing even under shared propagation
/// (where `MS_MOVE` is refused).
pub fn bind_read_only(source: &Path, target: &Path, noexec: bool) -> io::Result<()> {
    bind_read_only_with(source, target, noexec, MsFlags::MS_BIND)
}

/// Like [`bind_read_only`], with the mounts below `source` too (a namespace
/// catalog includes generations that are their own tmpfs mounts; those are
/// read-only binds already, and a recursive bind copies their flags).
pub fn rbind_read_only(source: &Path, target: &Path, noexec: bool) -> io::Result<()> {
    bind_read_only_with(source, target, noexec, MsFlags::MS_BIND | MsFlags::MS_REC)
}

fn bind_read_only_with(source: &Path, target: &Path, noexec: bool, bind: MsFlags) -> io::Result<()> {
    mount(Some(source), target, None::<&str>, bind, None::<&str>).map_err(io::Error::from)?;
    let mut flags =
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if noexec {
        flags |= MsFlags::MS_NOEXEC;
    }
    if let Err(e) = mount(None::<&str>, target, None::<&str>, flags, None::<&str>) {
        // Never leave a writable bind behind.
        let _ = umount2(target, MntFlags::MNT_DETACH);
        return Err(io::Error::from(e));
    }
    Ok(())
}

/// Detaches the mount at `target`. Processes that still map its files keep
/// them; the memory is freed when the last one goes.
pub fn unmount_lazy(target: &Path) -> io::Result<()> {
    umount2(target, MntFlags::MNT_DETACH).map_err(io::Error::from)
}

/// One line of `/proc/self/mountinfo`, the fields the agent uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// The directory of its filesystem that is mounted (`/` for a whole
    /// filesystem, a subdirectory for a bind mount such as a hostPath volume).
    pub root: PathBuf,
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// Filesystem type (`tmpfs`).
    pub fs_type: String,
    /// Per-mount options (`ro,nosuid,…`).
    pub mount_options: String,
    /// Superblock options (`size=…,huge=…`).
    pub super_options: String,
}

/// Parses mountinfo text (see proc(5)); octal escapes in paths are decoded.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let right: Vec<&str> = right.split(' ').collect();
            Some(MountEntry {
                root: PathBuf::from(unescape(left.get(3)?)),
                mount_point: PathBuf::from(unescape(left.get(4)?)),
                mount_options: left.get(5)?.to_string(),
                fs_type: right.first()?.to_string(),
                super_options: right.get(2).unwrap_or(&"").to_string(),
            })
        })
        .collect()
}

fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The current process's mounts.
pub fn mounts() -> io::Result<Vec<MountEntry>> {
    Ok(parse_mountinfo(&std::fs::read_to_string("/proc/self/mountinfo")?))
}

/// The mount whose mount point is exactly `path`, if any (the last one wins,
/// as the kernel shows stacked mounts in order).
pub fn mount_at(path: &Path) -> io::Result<Option<MountEntry>> {
    Ok(mounts()?.into_iter().rev().find(|m| m.mount_point == path))
}

/// The mount `path` lies on: the deepest mount point that is `path` or one
/// of its ancestors, the last listed of those (stacked mounts are listed
/// bottom first); `path` made absolute, symlinks resolved.
pub fn mount_containing(path: &Path) -> io::Result<Option<MountEntry>> {
    let path = std::fs::canonicalize(path)?;
    Ok(mounts()?
        .into_iter()
        .filter(|m| path.starts_with(&m.mount_point))
        .max_by_key(|m| m.mount_point.components().count()))
}

/// Mount points strictly below `dir`, deepest first (the order to unmount in).
pub fn mounts_under(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut found: Vec<PathBuf> = mounts()?
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p != dir && p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    Ok(found)
}

/// True when `path` lies on a tmpfs (so its pages are shared memory).
pub fn is_on_tmpfs(path: &Path) -> io::Result<bool> {
    let st = nix::sys::statfs::statfs(path).map_err(io::Error::from)?;
    Ok(st.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_lines() {
        let text = "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    42 27 0:39 / /dev/shm/zerocopy/ns/m/abc ro,nosuid,nodev,relatime shared:5 - tmpfs zerocopy rw,size=10240k,huge=within_size\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt/with space"));
        assert_eq!(m[0].root, PathBuf::from("/mnt1"));
        assert_eq!(m[1].root, PathBuf::from("/"));
        assert_eq!(m[1].fs_type, "tmpfs");
        assert!(m[1].mount_options.starts_with("ro,"));
        assert!(m[1].super_options.contains("huge=within_size"));
    }
}
