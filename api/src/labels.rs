//! Label, annotation and driver names. One place, so a rename cannot drift.

/// API group of every zerocopy kind.
pub const GROUP: &str = "zerocopy.dev";
/// Served version.
pub const VERSION: &str = "v1alpha1";
/// CSI driver name pods reference in `volumes[].csi.driver`.
pub const CSI_DRIVER: &str = "csi.zerocopy.dev";
/// Prefix of every label and annotation the project writes.
pub const PREFIX: &str = "zerocopy.dev/";
/// Label on a ModelReplica naming the node it is placed on.
pub const NODE_LABEL: &str = "zerocopy.dev/node";
/// `volumeAttributes` key naming the ModelWrapper to mount.
pub const VOLUME_ATTRIBUTE_WRAPPER: &str = "modelWrapper";
/// Node label prefix set where a wrapper is Ready.
pub const READY_LABEL_PREFIX: &str = "ready.zerocopy.dev/";
