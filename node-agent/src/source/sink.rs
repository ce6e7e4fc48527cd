//! Writes a stream of chunks to a staging file while a second thread hashes
//! them, so sha256 and the copy overlap instead of adding up.

use std::fs::File;
use std::io::{self, Write};
use std::sync::mpsc;
use std::thread;

use bytes::Bytes;
use sha2::{Digest, Sha256};

/// Chunks in flight between the writer and the hasher; bounds memory to
/// `HASH_QUEUE × chunk size`.
const HASH_QUEUE: usize = 8;

/// A staging file plus its running digest.
pub struct HashingSink {
    file: File,
    written: u64,
    limit: u64,
    to_hasher: Option<mpsc::SyncSender<Bytes>>,
    hasher: Option<thread::JoinHandle<Sha256>>,
}

/// Returned when a source delivers more bytes than the fill may hold.
#[derive(Debug)]
pub struct OverLimit {
    /// The limit that was crossed.
    pub limit: u64,
}

impl HashingSink {
    /// Starts writing to `file`; more than `limit` bytes is refused.
    pub fn new(file: File, limit: u64) -> Self {
        let (tx, rx) = mpsc::sync_channel::<Bytes>(HASH_QUEUE);
        let hasher = thread::spawn(move || {
            let mut h = Sha256::new();
            for chunk in rx {
                h.update(&chunk);
            }
            h
        });
        Self {
            file,
            written: 0,
            limit,
            to_hasher: Some(tx),
            hasher: Some(hasher),
        }
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
            tx.send(chunk).map_err(|_| io::Error::other("hasher thread stopped"))?;
        }
        Ok(Ok(()))
    }

    /// Closes the file and returns (bytes, lowercase hex sha256).
    pub fn finish(mut self) -> io::Result<(u64, String)> {
        self.file.flush()?;
        drop(self.to_hasher.take());
        let hasher = self
            .hasher
            .take()
            .ok_or_else(|| io::Error::other("hasher already joined"))?;
        let digest = hasher
            .join()
            .map_err(|_| io::Error::other("hasher thread panicked"))?
            .finalize();
        Ok((self.written, hex::encode(digest)))
    }
}
