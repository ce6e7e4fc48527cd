//! The CSI node plugin: Identity and Node services on a unix socket, serving
//! ModelWrapper generations to pods as read-only bind mounts.
//!
//! - [`paths`]: request validation (pure).
//! - [`ledger`]: publications recorded on disk before NodePublish returns.
//! - [`catalog`]: which generation each wrapper wants, and fill progress.
//! - [`node`] / [`identity`]: the gRPC services; every error is mapped to one
//!   gRPC code on purpose and logged here, because kubelet is the only other
//!   place it would show.
//! - [`client`]: a channel to a CSI socket, as kubelet opens one.
//! - [`server`]: the socket (stale one removed, mode 0600) and the tonic server.

pub mod catalog;
pub mod client;
pub mod identity;
pub mod inflight;
pub mod ledger;
pub mod metrics;
pub mod node;
pub mod paths;
pub mod server;

/// Generated CSI v1 messages and services (proto/csi.proto).
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    clippy::expect_used
)]
pub mod proto {
    tonic::include_proto!("csi.v1");
}

/// `volume_context` key kubelet sets to the pod's namespace (podInfoOnMount).
pub const POD_NAMESPACE: &str = "csi.storage.k8s.io/pod.namespace";
/// `volume_context` key with the pod's name.
pub const POD_NAME: &str = "csi.storage.k8s.io/pod.name";
/// `volume_context` key with the pod's UID.
pub const POD_UID: &str = "csi.storage.k8s.io/pod.uid";
/// `volume_context` key set to "true" for ephemeral inline volumes.
pub const EPHEMERAL: &str = "csi.storage.k8s.io/ephemeral";
