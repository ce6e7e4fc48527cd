//! Types shared by every zerocopy component: the `ModelWrapper` spec, the
//! on-node volume format (`manifest.json`, file names, generation digest,
//! safetensors header rules) and spec validation.
//!
//! Everything here is pure: no filesystem, network or Kubernetes API access,
//! so the node agent, the operator and the loaders agree on one definition.

pub mod format;
pub mod labels;
pub mod manifest;
pub mod quantity;
pub mod replica;
pub mod safetensors;
pub mod source;
pub mod spec;
pub mod task;
pub mod validation;

pub use manifest::Manifest;
pub use replica::{ModelReplica, ModelReplicaSpec, ModelReplicaStatus, ReplicaPhase};
pub use spec::{ModelWrapper, ModelWrapperSpec, ModelWrapperStatus, Placement};
pub use task::{ModelTask, ModelTaskSpec, ModelTaskStatus};
pub use validation::{validate_sources, validate_wrapper, Pinning, ValidationErrors};
