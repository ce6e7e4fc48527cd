//! `file://` sources: a path on the node (or, standalone, on this machine).

use std::fs::File;
use std::io::Read;
use std::path::PathBuf;

use bytes::BytesMut;

use super::sink::HashingSink;
use super::{FetchError, Fetched, Progress};

/// Read size: large enough to amortise syscalls, small enough to stay in cache.
const CHUNK: usize = 4 << 20;

/// The local path of a `file://` URI.
pub fn path_of(uri: &url::Url) -> Result<PathBuf, FetchError> {
    uri.to_file_path()
        .map_err(|_| FetchError::Unreachable(format!("{uri} is not an absolute file path")))
}

/// Size of the file, for capacity planning.
pub fn size(uri: &url::Url) -> Result<u64, FetchError> {
    let path = path_of(uri)?;
    std::fs::metadata(&path)
        .map(|m| m.len())
        .map_err(|e| FetchError::Unreachable(format!("{}: {e}", path.display())))
}

/// Copies the file into `sink`, reporting progress.
pub fn fetch(uri: &url::Url, mut sink: HashingSink, progress: &dyn Progress) -> Result<Fetched, FetchError> {
    let path = path_of(uri)?;
    let mut src = File::open(&path).map_err(|e| FetchError::Unreachable(format!("{}: {e}", path.display())))?;
    loop {
        let mut buf = BytesMut::zeroed(CHUNK);
        let n = src
            .read(&mut buf)
            .map_err(|e| FetchError::Unreachable(format!("reading {}: {e}", path.display())))?;
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
