//! `file://` sources: a path on the node (or, standalone, on this machine).
//!
//! In a cluster the path must lie below a directory the admin allowed, and
//! it is opened beneath that directory without following any symlink, so a
//! tenant's URI cannot reach kubelet credentials, other pods' tokens, /proc,
//! or other namespaces' generations.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use bytes::BytesMut;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};

use super::policy::SourcePolicy;
use super::sink::{HashingSink, KernelCopy};
use super::{FetchError, Fetched, Progress};

/// Read size: large enough to amortise syscalls, small enough to stay in cache.
const CHUNK: usize = 4 << 20;
/// Kernel copy size: one hasher message per chunk, hashed while the next
/// chunk is copied.
const COPY_CHUNK: usize = 16 << 20;

/// Errors with which `copy_file_range` says "not for these two files" (old
/// kernels, filesystems that refuse it, special files) rather than failing.
fn cannot_copy_in_kernel(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP | libc::EBADF)
    )
}

/// The local path of a `file://` URI.
pub fn path_of(uri: &url::Url) -> Result<PathBuf, FetchError> {
    uri.to_file_path()
        .map_err(|_| FetchError::Unreachable(format!("{uri} is not an absolute file path")))
}

/// Opens the regular file `uri` names, as `policy` allows, and returns it
/// with its size.
pub fn open(uri: &url::Url, policy: &SourcePolicy) -> Result<(File, u64), FetchError> {
    let path = path_of(uri)?;
    let file = match policy.file_location(&path).map_err(FetchError::Refused)? {
        // O_NONBLOCK: opening a FIFO must not hang the fill (refused below).
        None => std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .map_err(|e| FetchError::Unreachable(format!("{}: {e}", path.display())))?,
        Some((dir, rel)) => open_beneath(&dir, &rel).map_err(|e| match e {
            nix::Error::ELOOP | nix::Error::EXDEV => FetchError::Refused(format!(
                "{} goes through a symlink or leaves {}; sources below an allowed directory are opened without following symlinks",
                path.display(),
                dir.display()
            )),
            e => FetchError::Unreachable(format!("{}: {e}", path.display())),
        })?,
    };
    let meta = file
        .metadata()
        .map_err(|e| FetchError::Unreachable(format!("{}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(FetchError::Refused(format!("{} is not a regular file", path.display())));
    }
    Ok((file, meta.len()))
}

fn open_beneath(dir: &std::path::Path, rel: &std::path::Path) -> nix::Result<File> {
    let dir_fd = nix::fcntl::open(
        dir,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOCTTY | OFlag::O_NONBLOCK)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let fd = nix::fcntl::openat2(&dir_fd, rel, how)?;
    Ok(File::from(fd))
}

/// Copies `src` into `sink`, reporting progress, until done or `cancelled`:
/// in the kernel where the two files allow it, else through a buffer.
pub fn fetch(
    mut src: File,
    what: &str,
    mut sink: HashingSink,
    progress: &dyn Progress,
    cancelled: &std::sync::atomic::AtomicBool,
) -> Result<Fetched, FetchError> {
    // copy_file_range first (it may share blocks on one filesystem), then
    // sendfile (one copy between any two), then a buffer (two copies).
    let mut kernel_copy = Some(KernelCopy::CopyFileRange);
    loop {
        if cancelled.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(FetchError::Write(std::io::Error::other("the fill was stopped")));
        }
        if let Some(how) = kernel_copy {
            match sink.copy_from(&src, COPY_CHUNK, how) {
                Ok(Ok(0)) => break,
                Ok(Ok(n)) => {
                    progress.advance(n as u64);
                    continue;
                }
                Ok(Err(over)) => return Err(FetchError::TooLarge(over.limit)),
                Err(e) if cannot_copy_in_kernel(&e) => {
                    tracing::debug!(source = what, error = %e, method = ?how, "kernel copy unavailable for these files: trying the next way");
                    kernel_copy = match how {
                        KernelCopy::CopyFileRange => Some(KernelCopy::Sendfile),
                        KernelCopy::Sendfile => None,
                    };
                    continue;
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EFBIG | libc::EDQUOT)) => {
                    return Err(FetchError::Write(e))
                }
                Err(e) => return Err(FetchError::Unreachable(format!("reading {what}: {e}"))),
            }
        }
        let mut buf = BytesMut::zeroed(CHUNK);
        let n = src
            .read(&mut buf)
            .map_err(|e| FetchError::Unreachable(format!("reading {what}: {e}")))?;
        if n == 0 {
            break;
        }
        buf.truncate(n);
        sink.write(buf.freeze())
            .map_err(FetchError::Write)?
            .map_err(|o| FetchError::TooLarge(o.limit))?;
        progress.advance(n as u64);
    }
    let (bytes, sha256) = sink.finish().map_err(FetchError::Write)?;
    Ok(Fetched {
        bytes,
        sha256,
        resumes: 0,
    })
}
