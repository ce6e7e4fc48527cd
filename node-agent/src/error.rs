//! Errors of the fill boundary: each names the wrapper, the component or file,
//! and what to do.

use std::path::PathBuf;

use zerocopy_api::quantity::HumanBytes;
use zerocopy_api::safetensors::HeaderError;
use zerocopy_api::ValidationErrors;

/// Why a generation could not be filled. Nothing is published when any occurs.
#[derive(Debug, thiserror::Error)]
pub enum FillError {
    /// The spec itself is wrong.
    #[error(transparent)]
    Invalid(#[from] ValidationErrors),
    /// The source could not be read (missing file, refused connection, DNS).
    #[error("{wrapper}: component {component}: cannot read {uri}: {reason}")]
    Source {
        /// namespace/name
        wrapper: String,
        /// Component, or `pipeline` for the pipeline skeleton.
        component: String,
        /// The source URI.
        uri: String,
        /// What failed.
        reason: String,
    },
    /// The server answered with an error status.
    #[error("{wrapper}: component {component}: {uri} answered HTTP {status}{hint}")]
    HttpStatus {
        /// namespace/name
        wrapper: String,
        /// Component.
        component: String,
        /// The source URI.
        uri: String,
        /// Status code.
        status: u16,
        /// A hint for common statuses.
        hint: &'static str,
    },
    /// The body ended before its announced length, even after resuming.
    #[error("{wrapper}: component {component}: {uri} ended after {got} of {expected} bytes (truncated body; resumed {resumes} times)")]
    Truncated {
        /// namespace/name
        wrapper: String,
        /// Component.
        component: String,
        /// The source URI.
        uri: String,
        /// Bytes received.
        got: u64,
        /// Content-Length.
        expected: u64,
        /// Range requests tried.
        resumes: u32,
    },
    /// The bytes do not match the pinned digest.
    #[error("{wrapper}: component {component}: sha256 mismatch for {uri}: expected {expected}, got {actual}; the source changed or is corrupt; fix the source or the sha256 in the spec")]
    DigestMismatch {
        /// namespace/name
        wrapper: String,
        /// Component.
        component: String,
        /// The source URI.
        uri: String,
        /// From the spec.
        expected: String,
        /// Computed.
        actual: String,
    },
    /// The weights are not an acceptable safetensors file.
    #[error("{wrapper}: component {component}: {uri} is not a valid safetensors file: {source}")]
    Header {
        /// namespace/name
        wrapper: String,
        /// Component.
        component: String,
        /// The source URI.
        uri: String,
        /// The rule that failed.
        source: Box<HeaderError>,
    },
    /// The fill would not fit.
    #[error("{wrapper}: needs {} but only {} of the {} capacity is free ({} used by other generations); raise --capacity or remove unused wrappers", HumanBytes(*.needed), HumanBytes(.capacity.saturating_sub(*.used)), HumanBytes(*.capacity), HumanBytes(*.used))]
    Capacity {
        /// namespace/name
        wrapper: String,
        /// Bytes this generation needs.
        needed: u64,
        /// Configured capacity.
        capacity: u64,
        /// Bytes other generations hold.
        used: u64,
    },
    /// The source sent more bytes than the capacity left for this fill.
    #[error("{wrapper}: component {component}: {uri} sent more than the {} still free under the capacity; raise --capacity or check the source", HumanBytes(*.limit))]
    SourceTooLarge {
        /// namespace/name
        wrapper: String,
        /// Component.
        component: String,
        /// The source URI.
        uri: String,
        /// Bytes that were free.
        limit: u64,
    },
    /// Local filesystem or mount failure.
    #[error("{wrapper}: {action} {}: {source}", path.display())]
    Io {
        /// namespace/name
        wrapper: String,
        /// What was being done.
        action: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

impl FillError {
    /// A short stable category, for metrics labels and the summary table.
    pub fn category(&self) -> &'static str {
        match self {
            FillError::Invalid(_) => "invalid",
            FillError::Source { .. } => "source",
            FillError::HttpStatus { .. } => "http_status",
            FillError::Truncated { .. } => "truncated",
            FillError::DigestMismatch { .. } => "digest_mismatch",
            FillError::Header { .. } => "bad_header",
            FillError::Capacity { .. } | FillError::SourceTooLarge { .. } => "capacity",
            FillError::Io { .. } => "io",
        }
    }
}
