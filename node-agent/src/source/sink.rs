//! Writes a stream of chunks to a staging file while a second thread hashes
//! them, so sha256 and the copy overlap instead of adding up.
//!
//! Local files (`file://` sources, uploads) are copied by the kernel
//! (`copy_file_range`, or `sendfile` where the two filesystems differ): no
//! byte passes through this process on the way in, and the hasher reads each
//! copied range back from the staging file's page cache through a mapping,
//! so the digest is of the bytes actually staged.

use std::fs::File;
use std::io::{self, Write};
use std::sync::{mpsc, Arc};
use std::thread;

use bytes::Bytes;
use sha2::{Digest, Sha256};

/// Chunks in flight between the writer and the hasher; bounds memory to
/// `HASH_QUEUE × chunk size`.
const HASH_QUEUE: usize = 8;

/// What the hasher reads next: a chunk in memory, or a range of the
/// staging file the kernel copied.
enum ToHash {
    Bytes(Bytes),
    Staged { file: Arc<File>, offset: u64, len: usize },
}

/// How the kernel moves a local file's bytes into the staging file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelCopy {
    /// `copy_file_range`: within one filesystem it may share blocks instead
    /// of copying; most pairs of different filesystems refuse it (`EXDEV`).
    CopyFileRange,
    /// `sendfile`: from the source's page cache straight into the staging
    /// file, one copy in the kernel, between any two filesystems (a disk
    /// into tmpfs). A buffer in this process would cost a second copy.
    Sendfile,
}

/// A staging file plus its running digest.
pub struct HashingSink {
    file: File,
    written: u64,
    limit: u64,
    to_hasher: Option<mpsc::SyncSender<ToHash>>,
    hasher: Option<thread::JoinHandle<io::Result<Sha256>>>,
    /// A second handle on the staging file, for the hasher's mappings.
    reader: Option<Arc<File>>,
}

/// Returned when a source delivers more bytes than the fill may hold.
#[derive(Debug)]
pub struct OverLimit {
    /// The limit that was crossed.
    pub limit: u64,
}

impl HashingSink {
    /// Starts writing to `file` (opened for reading too: the hasher maps the
    /// ranges the kernel copies); more than `limit` bytes is refused.
    pub fn new(file: File, limit: u64) -> Self {
        let (tx, rx) = mpsc::sync_channel::<ToHash>(HASH_QUEUE);
        let hasher = thread::spawn(move || {
            let mut h = Sha256::new();
            for chunk in rx {
                match chunk {
                    ToHash::Bytes(bytes) => h.update(&bytes),
                    ToHash::Staged { file, offset, len } => {
                        // SAFETY: the staging file is this fill's own (created by
                        // it in the agent's staging directory); the range was
                        // completely written before it was sent here, and nothing
                        // truncates the file while the fill runs, so every mapped
                        // page stays backed while the mapping lives (this block).
                        #[allow(unsafe_code)] // mapping memory: the one use in this crate
                        // populate: one call maps the whole range instead of a
                        // page fault per 4 KiB page while hashing.
                        let map = unsafe {
                            memmap2::MmapOptions::new()
                                .offset(offset)
                                .len(len)
                                .populate()
                                .map(&*file)
                        }?;
                        h.update(&map[..]);
                    }
                }
            }
            Ok(h)
        });
        Self {
            file,
            written: 0,
            limit,
            to_hasher: Some(tx),
            hasher: Some(hasher),
            reader: None,
        }
    }

    /// Copies up to `max` bytes from `src`'s current offset to the end of the
    /// staging file in the kernel, `how` says with which call, and queues the
    /// range for hashing. `Ok(Ok(0))` at the end of `src`. An error such as
    /// `EXDEV`/`EINVAL`/`EOPNOTSUPP` means this pair of files cannot be copied
    /// this way: nothing was copied by this call, and another [`KernelCopy`]
    /// or [`HashingSink::write`] can take over at the same offsets.
    pub fn copy_from(&mut self, src: &File, max: usize, how: KernelCopy) -> io::Result<Result<usize, OverLimit>> {
        // One byte past the limit is enough to know the source is too large.
        let room = self.limit.saturating_sub(self.written).saturating_add(1);
        let len = max.min(usize::try_from(room).unwrap_or(usize::MAX));
        let n = match how {
            KernelCopy::CopyFileRange => nix::fcntl::copy_file_range(src, None, &self.file, None, len),
            KernelCopy::Sendfile => nix::sys::sendfile::sendfile64(&self.file, src, None, len),
        }
        .map_err(io::Error::from)?;
        if n == 0 {
            return Ok(Ok(0));
        }
        if self.written + n as u64 > self.limit {
            return Ok(Err(OverLimit { limit: self.limit }));
        }
        let offset = self.written;
        self.written += n as u64;
        self.hash_staged(offset, n)?;
        Ok(Ok(n))
    }

    /// Queues `len` staged bytes at `offset` for the hasher.
    fn hash_staged(&mut self, offset: u64, len: usize) -> io::Result<()> {
        let file = match &self.reader {
            Some(f) => f.clone(),
            None => self.reader.insert(Arc::new(self.file.try_clone()?)).clone(),
        };
        if let Some(tx) = &self.to_hasher {
            if tx.send(ToHash::Staged { file, offset, len }).is_err() {
                return Err(self.hasher_failure());
            }
        }
        Ok(())
    }

    /// The staging file, for writers that place ranges at their offsets
    /// themselves (parallel range downloads); they hand each completed
    /// prefix to [`HashingSink::staged`].
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Hashes `len` bytes at `offset` that were written through another
    /// handle. Ranges must come in file order, starting where the sink
    /// stands, so the digest is of the file front to back.
    pub fn staged(&mut self, offset: u64, len: usize) -> io::Result<()> {
        if offset != self.written {
            return Err(io::Error::other(format!(
                "staged range at {offset} but {} bytes are hashed",
                self.written
            )));
        }
        if len == 0 {
            return Ok(());
        }
        self.written += len as u64;
        self.hash_staged(offset, len)
    }

    /// The most bytes this sink takes.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Appends one chunk.
    pub fn write(&mut self, chunk: Bytes) -> io::Result<Result<(), OverLimit>> {
        if self.written + chunk.len() as u64 > self.limit {
            return Ok(Err(OverLimit { limit: self.limit }));
        }
        self.file.write_all(&chunk)?;
        self.written += chunk.len() as u64;
        if let Some(tx) = &self.to_hasher {
            if tx.send(ToHash::Bytes(chunk)).is_err() {
                return Err(self.hasher_failure());
            }
        }
        Ok(Ok(()))
    }

    /// Why the hasher stopped early (it only stops on an error).
    fn hasher_failure(&mut self) -> io::Error {
        drop(self.to_hasher.take());
        match self.hasher.take().map(thread::JoinHandle::join) {
            Some(Ok(Err(e))) => io::Error::new(e.kind(), format!("hashing the staged file: {e}")),
            Some(Err(_)) => io::Error::other("hasher thread panicked"),
            _ => io::Error::other("hasher thread stopped"),
        }
    }

    /// Sets the staging file's size to the `len` bytes the source announced
    /// before any is written: a tmpfs mounted `huge=within_size` then gives
    /// it 2 MiB pages however small the writes are (on a tmpfs without huge
    /// pages it measured a few percent slower, so callers size only there).
    /// [`HashingSink::finish`] cuts the file back to what was written if the
    /// source sent less.
    pub fn expect_len(&self, len: u64) -> io::Result<()> {
        if len <= self.limit {
            self.file.set_len(len)?;
        }
        Ok(())
    }

    /// Closes the file and returns (bytes, lowercase hex sha256).
    pub fn finish(mut self) -> io::Result<(u64, String)> {
        self.file.flush()?;
        if self.file.metadata()?.len() != self.written {
            self.file.set_len(self.written)?;
        }
        drop(self.to_hasher.take());
        let hasher = self
            .hasher
            .take()
            .ok_or_else(|| io::Error::other("hasher already joined"))?;
        let digest = hasher
            .join()
            .map_err(|_| io::Error::other("hasher thread panicked"))??
            .finalize();
        Ok((self.written, hex::encode(digest)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom};

    fn content(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4093) as u8).collect()
    }

    fn staging(path: &std::path::Path) -> File {
        File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .unwrap()
    }

    fn source(dir: &std::path::Path, bytes: &[u8]) -> File {
        let path = dir.join("src");
        std::fs::write(&path, bytes).unwrap();
        File::open(path).unwrap()
    }

    #[test]
    fn a_kernel_copy_stages_and_hashes_the_same_bytes_as_a_write() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = content(5 * 1024 * 1024 + 123);
        let src = source(dir.path(), &bytes);
        let mut sink = HashingSink::new(staging(&dir.path().join("dst")), u64::MAX);
        // Mixed on purpose: a copy, a write of the next bytes, copies again.
        let first = sink
            .copy_from(&src, 1 << 20, KernelCopy::CopyFileRange)
            .unwrap()
            .unwrap();
        assert_eq!(first, 1 << 20);
        let mut src = src;
        src.seek(SeekFrom::Start(first as u64)).unwrap();
        let middle = Bytes::copy_from_slice(&bytes[first..first + 4096]);
        sink.write(middle).unwrap().unwrap();
        src.seek(SeekFrom::Start((first + 4096) as u64)).unwrap();
        while sink
            .copy_from(&src, 3 << 20, KernelCopy::CopyFileRange)
            .unwrap()
            .unwrap()
            > 0
        {}
        let (n, sha) = sink.finish().unwrap();
        assert_eq!(n, bytes.len() as u64);
        assert_eq!(sha, hex::encode(Sha256::digest(&bytes)));
        assert_eq!(std::fs::read(dir.path().join("dst")).unwrap(), bytes);
    }

    #[test]
    fn sendfile_into_tmpfs_stages_and_hashes_the_same_bytes_as_a_write() {
        let disk = tempfile::tempdir().unwrap();
        let shm = tempfile::tempdir_in("/dev/shm").unwrap();
        let bytes = content(3 * 1024 * 1024 + 17);
        let mut src = source(disk.path(), &bytes);
        let mut sink = HashingSink::new(staging(&shm.path().join("dst")), u64::MAX);
        let first = sink.copy_from(&src, 1 << 20, KernelCopy::Sendfile).unwrap().unwrap();
        assert_eq!(first, 1 << 20);
        // sendfile advanced the source's offset: a write takes over there.
        assert_eq!(src.stream_position().unwrap(), first as u64);
        sink.write(Bytes::copy_from_slice(&bytes[first..first + 100]))
            .unwrap()
            .unwrap();
        src.seek(SeekFrom::Start((first + 100) as u64)).unwrap();
        while sink.copy_from(&src, 1 << 20, KernelCopy::Sendfile).unwrap().unwrap() > 0 {}
        let (n, sha) = sink.finish().unwrap();
        assert_eq!(n, bytes.len() as u64);
        assert_eq!(sha, hex::encode(Sha256::digest(&bytes)));
        assert_eq!(std::fs::read(shm.path().join("dst")).unwrap(), bytes);
    }

    #[test]
    fn a_kernel_copy_past_the_limit_is_refused() {
        for how in [KernelCopy::CopyFileRange, KernelCopy::Sendfile] {
            a_kernel_copy_past_the_limit_is_refused_with(how);
        }
    }

    fn a_kernel_copy_past_the_limit_is_refused_with(how: KernelCopy) {
        let dir = tempfile::tempdir().unwrap();
        let src = source(dir.path(), &content(10_000));
        let mut sink = HashingSink::new(staging(&dir.path().join("dst")), 9_999);
        let mut refused = false;
        for _ in 0..4 {
            match sink.copy_from(&src, 4096, how).unwrap() {
                Ok(0) => break,
                Ok(_) => {}
                Err(over) => {
                    assert_eq!(over.limit, 9_999);
                    refused = true;
                    break;
                }
            }
        }
        assert!(refused, "10,000 bytes into a 9,999-byte limit ({how:?})");
    }
}
