//! Whether this node's kernel gives a tmpfs transparent huge pages.
//!
//! `memory.hugePages: true` mounts a generation's tmpfs `huge=within_size`,
//! but whether the kernel then allocates 2 MiB pages depends on its build
//! and on `/sys/kernel/mm/transparent_hugepage/shmem_enabled` (and, on
//! kernels with per-size controls, `hugepages-2048kB/shmem_enabled`). The
//! mount succeeds either way, so without a probe a user asking for huge
//! pages silently gets 4 KiB ones (first-touch cost 118 ms/GiB instead of
//! 11, docs/benchmarks.md). The agent probes once at start and says so.

use std::fs;
use std::io::Write;
use std::path::Path;

use crate::mount;

/// What the probe found, for logs and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HugePages {
    /// A tmpfs mounted `huge=within_size` got at least one huge page.
    pub granted: bool,
    /// The kernel's settings, for the message.
    pub detail: String,
}

/// Bytes written by the probe: two huge pages.
const PROBE_BYTES: usize = 4 << 20;

/// Mounts a small tmpfs `huge=within_size` below `dir`, writes 4 MiB and
/// checks whether the kernel's count of shmem huge pages grew. Another
/// process allocating shmem huge pages at the same instant could make it
/// say yes wrongly; never no wrongly.
pub fn probe(dir: &Path) -> HugePages {
    let detail = settings();
    let target = dir.join(format!("huge-probe-{}", std::process::id()));
    if fs::create_dir_all(&target).is_err() {
        return HugePages {
            granted: false,
            detail: format!("{detail}; cannot create {}", target.display()),
        };
    }
    let granted = match mount::mount_tmpfs(&target, (2 * PROBE_BYTES) as u64, true) {
        Ok(()) => {
            let before = shmem_huge_kib();
            let wrote = write_probe(&target.join("probe"));
            let after = shmem_huge_kib();
            let _ = mount::unmount_lazy(&target);
            wrote.is_ok() && matches!((before, after), (Some(b), Some(a)) if a > b)
        }
        Err(_) => false,
    };
    let _ = fs::remove_dir(&target);
    HugePages { granted, detail }
}

fn write_probe(path: &Path) -> std::io::Result<()> {
    let mut f = fs::File::create(path)?;
    // within_size: huge pages only where the file already covers them.
    f.set_len(PROBE_BYTES as u64)?;
    f.write_all(&vec![1u8; PROBE_BYTES])?;
    f.sync_all()
}

fn shmem_huge_kib() -> Option<u64> {
    parse_shmem_huge_kib(&fs::read_to_string("/proc/meminfo").ok()?)
}

/// `ShmemHugePages` of a `/proc/meminfo` text, in KiB.
pub fn parse_shmem_huge_kib(meminfo: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("ShmemHugePages:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// The shmem THP settings, as `name=[selected]`.
fn settings() -> String {
    let read = |p: &str| {
        fs::read_to_string(p)
            .ok()
            .and_then(|s| selected(&s).map(str::to_owned))
            .unwrap_or_else(|| "absent".into())
    };
    format!(
        "shmem_enabled={}, hugepages-2048kB/shmem_enabled={}",
        read("/sys/kernel/mm/transparent_hugepage/shmem_enabled"),
        read("/sys/kernel/mm/transparent_hugepage/hugepages-2048kB/shmem_enabled"),
    )
}

/// The bracketed choice of a sysfs selector such as `always [never] deny`.
pub fn selected(text: &str) -> Option<&str> {
    let start = text.find('[')? + 1;
    let end = start + text[start..].find(']')?;
    Some(&text[start..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_kernels_words() {
        assert_eq!(
            parse_shmem_huge_kib("MemTotal: 1 kB\nShmemHugePages:     4096 kB\n"),
            Some(4096)
        );
        assert_eq!(parse_shmem_huge_kib("MemTotal: 1 kB\n"), None);
        assert_eq!(
            selected("always within_size advise [never] deny force\n"),
            Some("never")
        );
        assert_eq!(selected("always [inherit] within_size"), Some("inherit"));
        assert_eq!(selected("no brackets"), None);
    }

    #[test]
    fn the_probe_agrees_with_the_kernel() {
        if !nix::unistd::geteuid().is_root() {
            return; // mounting needs root; the integration tests run as root
        }
        let dir = tempfile::tempdir().unwrap();
        let found = probe(dir.path());
        // Whatever the answer, it left nothing mounted or behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0, "{found:?}");
        assert!(found.detail.contains("shmem_enabled="), "{found:?}");
        // Where the global setting denies huge pages, the probe must say no.
        if fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
            .ok()
            .as_deref()
            .and_then(selected)
            == Some("deny")
        {
            assert!(!found.granted);
        }
    }
}
