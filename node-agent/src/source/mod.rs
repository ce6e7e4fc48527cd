//! Where weights come from. Each source streams into a [`sink::HashingSink`]
//! and reports progress; the fill engine turns [`FetchError`] into a
//! [`crate::FillError`] that names the component.

pub mod file;
pub mod gcs;
pub mod hf;
pub mod http;
pub mod objects;
pub mod oci;
pub mod policy;
pub mod sink;

/// A completed download.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// Bytes written.
    pub bytes: u64,
    /// Lowercase hex sha256 of those bytes.
    pub sha256: String,
    /// Range resumptions needed.
    pub resumes: u32,
}

/// What went wrong fetching one file, before the component is known.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Missing file, refused connection, DNS, TLS.
    #[error("{0}")]
    Unreachable(String),
    /// The source policy refuses it (node files, internal addresses, …).
    #[error("{0}")]
    Refused(String),
    /// The source policy refuses the address a host name resolved to.
    /// Retried, unlike [`FetchError::Refused`]: DNS answers change.
    #[error("{0}")]
    RefusedByResolution(String),
    /// The server answered an error status.
    #[error("HTTP {0}")]
    Status(u16),
    /// The body ended early.
    #[error("truncated after {got} of {expected} bytes")]
    Truncated {
        /// Bytes received.
        got: u64,
        /// Announced length (0 when unknown).
        expected: u64,
        /// Resumptions tried.
        resumes: u32,
    },
    /// The source delivered more than the fill may hold.
    #[error("source is larger than the {0} bytes the fill may hold")]
    TooLarge(u64),
    /// Writing the staging file failed.
    #[error("writing staging file: {0}")]
    Write(std::io::Error),
}

/// Progress of one file; implemented by the standalone progress bars and,
/// later, by the CSI server's fill status.
pub trait Progress: Send + Sync {
    /// The total became known.
    fn set_total(&self, total: u64);
    /// `n` more bytes were written.
    fn advance(&self, n: u64);
}

/// Ignores progress.
#[derive(Debug, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn set_total(&self, _: u64) {}
    fn advance(&self, _: u64) {}
}
