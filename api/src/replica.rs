//! `ModelReplica`: one ModelWrapper on one node. The operator creates,
//! updates and deletes them (server-side apply, owner = the wrapper, label
//! `zerocopy.dev/node`); the node agent on that node fills the generation and
//! writes the status. One object per node keeps writes small and
//! conflict-free at 1,000 nodes.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::spec::{MemorySpec, Mode, ModelWrapperSpec, PipelineSpec};

/// What one node must hold: the wrapper's resolved sources at one generation.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "zerocopy.dev",
    version = "v1alpha1",
    kind = "ModelReplica",
    namespaced,
    shortname = "mr",
    status = "ModelReplicaStatus",
    printcolumn = r#"{"name":"Wrapper","type":"string","jsonPath":".spec.wrapper"}"#,
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".spec.node"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Generation","type":"string","jsonPath":".spec.generation"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ModelReplicaSpec {
    /// The ModelWrapper (same namespace) this replica places.
    pub wrapper: String,
    /// The node that holds it.
    pub node: String,
    /// Generation digest of the sources below (`format::generation_digest`).
    pub generation: String,
    /// Mode of the wrapper (part of the generation).
    #[serde(default)]
    pub mode: Mode,
    /// The sources to fill.
    pub pipeline: PipelineSpec,
    /// Memory options.
    #[serde(default)]
    pub memory: MemorySpec,
}

impl ModelReplicaSpec {
    /// The wrapper spec the node agent fills (no selector or task template:
    /// those do not change what is on the node).
    pub fn wrapper_spec(&self) -> ModelWrapperSpec {
        ModelWrapperSpec {
            mode: self.mode,
            pipeline: self.pipeline.clone(),
            node_selector: Default::default(),
            placement: Default::default(),
            memory: self.memory.clone(),
            task: None,
        }
    }
}

/// Phase of one replica, written by the node agent.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ReplicaPhase {
    /// Not started on the node yet.
    #[default]
    Pending,
    /// Downloading and verifying.
    Filling,
    /// The generation is published on the node.
    Ready,
    /// The fill failed; `message` and `reason` say why, `nextRetryTime` when
    /// it is tried again.
    Failed,
}

/// One file of a fill in progress.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FileProgress {
    /// Its path in the generation (`encoder.safetensors`, `llm/config.json`).
    pub file: String,
    /// Bytes written so far.
    pub bytes_done: u64,
    /// Its size, when the source told it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_total: Option<u64>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Observed state on the node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelReplicaStatus {
    /// Pending, Filling, Ready or Failed.
    #[serde(default)]
    pub phase: ReplicaPhase,
    /// Bytes of the generation.
    #[serde(default)]
    pub bytes_total: u64,
    /// While Filling: files the generation holds.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub files_total: u32,
    /// While Filling: files completely written.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub files_done: u32,
    /// While Filling: the files being written now (at most 16), each with
    /// its bytes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filling: Vec<FileProgress>,
    /// Bytes filled so far.
    #[serde(default)]
    pub bytes_done: u64,
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<String>,
    /// Digest of the filled generation (equal to `generation` when Ready).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Why it failed, or fill progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When Failed: SourceUnavailable, SourceTooSlow, IntegrityMismatch,
    /// InsufficientCapacity, SourceRefused, InvalidSpec or NodeError.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When Failed: failed attempts in a row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// When Failed and retried: when the next attempt starts (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_retry_time: Option<String>,
    /// What each directory source resolved to when Ready, by component: the
    /// commit of an `hf://` revision, the manifest digest of an `oci://` tag.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub revisions: BTreeMap<String, String>,
    /// Pods on the node that mount this wrapper.
    #[serde(default)]
    pub mounts: u32,
    /// Where the node's agent serves Ready generations to other agents
    /// (`http://<node address>:<port>`); set by the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}
