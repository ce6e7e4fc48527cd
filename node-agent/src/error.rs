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
    /// The agent's source policy refuses the source (node files outside the
    /// allowed directories, internal or metadata addresses, downgrades).
    #[error("{wrapper}: component {component}: source {uri} refused: {reason}")]
    Refused {
        /// namespace/name
        wrapper: String,
        /// Component, or `pipeline` for the pipeline skeleton.
        component: String,
        /// The source URI.
        uri: String,
        /// Why, and which value would allow it.
        reason: String,
        /// Refused for the address a host name resolved to: retried, since
        /// the next DNS answer may differ.
        by_resolution: bool,
    },
    /// Nothing can send the bytes yet: an `upload:` source not uploaded and
    /// held by no peer, or a node ordered earlier is fetching them from the
    /// origin. Retried soon; not a failure of the source.
    #[error("{wrapper}: component {component}: {reason}")]
    WaitingForSource {
        /// namespace/name
        wrapper: String,
        /// Component.
        component: String,
        /// What it waits for.
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
    #[error("{wrapper}: component {component}: {what} mismatch for {uri}: expected {expected}, got {actual}; the source changed or is corrupt; fix the source or the digest in the spec")]
    DigestMismatch {
        /// namespace/name
        wrapper: String,
        /// Which digest.
        what: DigestKind,
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
    /// A directory source holds something the format cannot take: no
    /// safetensors file, an oversized auxiliary file, a file without a
    /// digest where one is required, an index naming missing shards.
    #[error("{wrapper}: component {component}: {uri}: {reason}")]
    BadContent {
        /// namespace/name
        wrapper: String,
        /// Component.
        component: String,
        /// The source (and file) URI.
        uri: String,
        /// What is wrong and what to do.
        reason: String,
    },
    /// The fill would not fit.
    #[error("{wrapper}: needs {} but only {} of the {} capacity is free; held by {held_by}. Generations that a replica still wants or a pod still mounts are kept: delete unused ModelWrappers, end the pods that mount an old generation, or raise --capacity", HumanBytes(*.needed), HumanBytes(.capacity.saturating_sub(*.used)), HumanBytes(*.capacity))]
    Capacity {
        /// namespace/name
        wrapper: String,
        /// Bytes this generation needs.
        needed: u64,
        /// Configured capacity.
        capacity: u64,
        /// Bytes other generations hold (and fills in progress reserve).
        used: u64,
        /// Who holds them: `ns/name@generation (size)`, fills in progress.
        held_by: String,
    },
    /// The fill ran past its overall deadline (`--fill-deadline`).
    #[error("{wrapper}: the fill did not finish within {}s; it is retried (a slow source, or raise --fill-deadline)", .seconds)]
    Deadline {
        /// namespace/name
        wrapper: String,
        /// The deadline.
        seconds: u64,
    },
    /// The source delivered less than the minimum throughput for a whole window.
    #[error("{wrapper}: only {} arrived in the last {}s, below the minimum of {}/s (--fill-min-throughput); the source looks stalled, the fill is retried", HumanBytes(*.bytes), .window, HumanBytes(*.min_per_second))]
    Stalled {
        /// namespace/name
        wrapper: String,
        /// Bytes received during the window.
        bytes: u64,
        /// Window length in seconds.
        window: u64,
        /// The floor, bytes per second.
        min_per_second: u64,
    },
    /// The source sent more bytes than this file may hold: the capacity left
    /// for weights, [`crate::fill::MAX_SKELETON_BYTES`] for a skeleton.
    #[error("{wrapper}: component {component}: {uri} sent more than the {} this file may hold (weights: what is still free under --capacity; skeletons: at most 64 MiB, a meta-device module holds no weights); check the source", HumanBytes(*.limit))]
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

/// The digest a file was checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DigestKind {
    /// sha256 of the content (the spec's pin, an LFS file's oid).
    Sha256,
    /// A Hub file kept in git: sha1 of `blob <len>\0<content>`.
    GitBlob,
    /// sha256 of the content, from the object store's own full-object
    /// checksum (S3 `ChecksumSHA256`).
    StoreSha256,
}

impl std::fmt::Display for DigestKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DigestKind::Sha256 => "sha256",
            DigestKind::GitBlob => "git blob id",
            DigestKind::StoreSha256 => "sha256 (the object's S3 ChecksumSHA256)",
        })
    }
}

impl FillError {
    /// The condition reason written to replica status, as Kubernetes users
    /// read it (`SourceUnavailable`, `IntegrityMismatch`, `InsufficientCapacity`, …).
    pub fn reason(&self) -> &'static str {
        match self {
            FillError::Invalid(_) => "InvalidSpec",
            FillError::BadContent { .. } => "InvalidSource",
            FillError::Refused { .. } => "SourceRefused",
            FillError::Source { .. } | FillError::HttpStatus { .. } | FillError::Truncated { .. } => {
                "SourceUnavailable"
            }
            FillError::DigestMismatch { .. } | FillError::Header { .. } => "IntegrityMismatch",
            FillError::Capacity { .. } | FillError::SourceTooLarge { .. } => "InsufficientCapacity",
            FillError::Deadline { .. } | FillError::Stalled { .. } => "SourceTooSlow",
            FillError::Io { .. } => "NodeError",
            FillError::WaitingForSource { .. } => crate::csi::catalog::WAITING_FOR_SOURCE,
        }
    }

    /// False when trying again cannot help until the spec or the agent's
    /// flags change (both start over anyway). A refusal because a host name
    /// resolved to a refused address is retried: the next answer may differ.
    pub fn is_retryable(&self) -> bool {
        match self {
            FillError::Refused { by_resolution, .. } => *by_resolution,
            FillError::Invalid(_) | FillError::BadContent { .. } => false,
            _ => true,
        }
    }

    /// A short stable category, for metrics labels and the summary table.
    pub fn category(&self) -> &'static str {
        match self {
            FillError::Invalid(_) => "invalid",
            FillError::BadContent { .. } => "bad_content",
            FillError::Source { .. } => "source",
            FillError::Refused { .. } => "refused",
            FillError::HttpStatus { .. } => "http_status",
            FillError::Truncated { .. } => "truncated",
            FillError::DigestMismatch { .. } => "digest_mismatch",
            FillError::Header { .. } => "bad_header",
            FillError::Capacity { .. } | FillError::SourceTooLarge { .. } => "capacity",
            FillError::Deadline { .. } => "deadline",
            FillError::Stalled { .. } => "stalled",
            FillError::Io { .. } => "io",
            FillError::WaitingForSource { .. } => "waiting",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(reason: &str, by_resolution: bool) -> FillError {
        FillError::Refused {
            wrapper: "ns/w".into(),
            component: "c".into(),
            uri: "https://models.example/x".into(),
            reason: reason.into(),
            by_resolution,
        }
    }

    #[test]
    fn a_refusal_by_name_resolution_is_retried_and_other_refusals_are_not() {
        let by_dns = refused(
            "host models.example resolves to a refused address: 10.0.0.7 is a private address",
            true,
        );
        assert!(
            by_dns.is_retryable(),
            "DNS answers change; the fill must heal when they do"
        );
        assert_eq!(by_dns.reason(), "SourceRefused");
        assert!(!refused("http://10.0.0.7/x: 10.0.0.7 is a private address", false).is_retryable());
        assert!(!refused("file:///etc/shadow is outside the allowed directories", false).is_retryable());
    }
}
