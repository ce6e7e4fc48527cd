//! The `ModelWrapper` custom resource (`zerocopy.dev/v1alpha1`).
//!
//! The same types are read by standalone mode from YAML files and by the
//! operator from the API server. CRD-facing enums are plain string enums and
//! "one of" choices are optional fields checked by [`crate::validate_wrapper`],
//! because untagged enums produce non-structural schemas.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A pipeline of named models, filled once per node into shared memory and
/// mounted read-only by pods.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "zerocopy.dev",
    version = "v1alpha1",
    kind = "ModelWrapper",
    namespaced,
    shortname = "mw",
    status = "ModelWrapperStatus",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.readyNodes"}"#,
    printcolumn = r#"{"name":"Desired","type":"integer","jsonPath":".status.desiredNodes"}"#,
    printcolumn = r#"{"name":"Size","type":"string","jsonPath":".status.size"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.mode != 'task' || has(self.task)", "message": "mode: task needs spec.task.template (the pod each ModelTask runs)"},
    {"rule": "self.pipeline.components.all(c, self.pipeline.components.exists_one(d, d.name == c.name))", "message": "component names must be unique"}
]))]
#[serde(rename_all = "camelCase")]
pub struct ModelWrapperSpec {
    /// `actor` (default): long-lived processes `load()` the pipeline.
    /// `task`: each ModelTask runs as a Job next to the weights.
    #[serde(default)]
    pub mode: Mode,
    /// The models to fill: one safetensors file or one directory each.
    pub pipeline: PipelineSpec,
    /// Nodes to place the weights on; empty means every node with an agent.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// `Nodes` (default): every node matching `nodeSelector`. `Consumers`:
    /// only those of them where a pod of this namespace mounts the namespace
    /// catalog or this wrapper (nodes that join later included), released a
    /// grace period after the last such pod left. `from_model()` sets it.
    #[serde(default, skip_serializing_if = "Placement::is_nodes")]
    pub placement: Placement,
    /// How the weights are held in memory.
    #[serde(default)]
    pub memory: MemorySpec,
    /// Required when `mode: task`: the pod template each task runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<TaskSpec>,
}

/// Where a wrapper goes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum Placement {
    /// Every node matching `nodeSelector`.
    #[default]
    Nodes,
    /// Nodes matching `nodeSelector` where pods of the namespace consume it.
    Consumers,
}

impl Placement {
    fn is_nodes(&self) -> bool {
        *self == Placement::Nodes
    }
}

/// Execution mode, as in the seed library.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Actors load the pipeline once and keep it.
    #[default]
    Actor,
    /// Every invocation is a Job on a node where the weights are Ready.
    Task,
}

impl Mode {
    /// The lowercase name used in YAML and the manifest.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Actor => "actor",
            Mode::Task => "task",
        }
    }
}

/// The pipeline: its components and, optionally, the pipeline object itself.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PipelineSpec {
    /// One entry per `nn.Module` attribute of the pipeline object (or one for
    /// a standalone module).
    #[schemars(length(min = 1, max = 64))]
    pub components: Vec<ComponentSpec>,
    /// A pickle of the pipeline object with its module attributes removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skeleton: Option<SourceSpec>,
}

/// One named model of the pipeline: one safetensors file (`weights`) or a
/// directory of files (`source`: a Hugging Face repo, a directory), exactly
/// one of the two.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.weights) != has(self.source)", "message": "set either weights (one safetensors file) or source (a repository or directory of files), not both"}
]))]
#[serde(rename_all = "camelCase")]
pub struct ComponentSpec {
    /// DNS-1123 label, unique within the pipeline; also the file name stem.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// The safetensors file holding the component's weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<SourceSpec>,
    /// A directory of files: safetensors shards plus config, tokenizer and
    /// other files, filled as `<component>/` and readable in place by
    /// `transformers` and vLLM (format v2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<DirectorySourceSpec>,
    /// How to rebuild the `nn.Module`; without it the component loads as a
    /// `dict[str, Tensor]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skeleton: Option<SkeletonSpec>,
}

/// A file to fetch, optionally pinned by digest.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SourceSpec {
    /// `file:///path`, `http://…` or `https://…`.
    pub uri: String,
    /// Lowercase hex sha256 of the file; verified while streaming.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// Many files from one place: `hf://org/repo[@revision]` (a Hugging Face
/// repository), `s3://bucket/prefix/`, `az://account/container/prefix/`,
/// `oci://registry/repo@sha256:…` or `file:///dir/` (a directory on the
/// node).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DirectorySourceSpec {
    /// `hf://org/repo@<commit or branch>`, `s3://bucket/prefix/`,
    /// `az://account/container/prefix/`, `oci://registry/repo:tag|@sha256:…`
    /// or `file:///dir/`.
    pub uri: String,
    /// Globs (`*.safetensors`, `1_Pooling/**`) of the paths to take; empty:
    /// every file but other weight formats (docs/FORMAT.md).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub include: Vec<String>,
    /// Globs of paths to leave out, applied after `include`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<String>,
    /// sha256 per path, for sources that do not carry their own digests
    /// (`file://`); a Hugging Face repo provides them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sha256: BTreeMap<String, String>,
    /// The server: for `hf://` a mirror or an on-premises hub (default: the
    /// agent's `--hf-endpoint`, `https://huggingface.co`); for `s3://` an
    /// S3-compatible server (MinIO, Ceph; default: AWS); for `az://` the
    /// account's blob endpoint; for `oci://` `http://host:port` of a
    /// plain-HTTP registry. A credentials Secret is sent to a spec-chosen
    /// endpoint only when the Secret names it (key `endpoint`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// `s3://`: the bucket's region (default `us-east-1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// A Secret in the wrapper's namespace, shared with the node agent
    /// (docs/security.md): the token (`hf://`, key `token`);
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and optionally
    /// `AWS_SESSION_TOKEN` (`s3://`); `AZURE_STORAGE_SAS_TOKEN` or
    /// `AZURE_STORAGE_ACCOUNT_KEY` (`az://`); `.dockerconfigjson` or
    /// `username` and `password` (`oci://`). Without one, requests are
    /// anonymous.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretKeyRef>,
}

/// One key of a Secret in the wrapper's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// The Secret's name.
    pub name: String,
    /// The key holding the token; default `token`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

impl SecretKeyRef {
    /// The key to read.
    pub fn key(&self) -> &str {
        self.key.as_deref().unwrap_or("token")
    }
}

/// Either a pickled meta-device module (`uri`) or a factory reference
/// (`factory`, `kwargs`); exactly one of `uri` and `factory`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SkeletonSpec {
    /// A module saved on the meta device with `torch.save`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    /// sha256 of the pickle at `uri`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// `package.module:callable` returning the module; no pickle involved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factory: Option<String>,
    /// JSON keyword arguments for `factory`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form_object")]
    pub kwargs: Option<serde_json::Map<String, serde_json::Value>>,
}

/// Memory options of the node copy.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemorySpec {
    /// Insist on transparent huge pages: where the node's volume root does
    /// not give them (the agent's own root tmpfs does, by default), the
    /// generation gets a tmpfs of its own, `huge=within_size`.
    #[serde(default)]
    pub huge_pages: bool,
    /// Ask loaders to populate page tables up front.
    #[serde(default)]
    pub prefault: bool,
}

/// The pod template of task mode.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TaskSpec {
    /// Image and command that use the model; the volume is added by the operator.
    pub template: PodTemplateSpec,
}

/// Observed state, aggregated by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelWrapperStatus {
    /// Pending, Filling, Ready, Degraded or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Nodes the wrapper is placed on.
    #[serde(default)]
    pub desired_nodes: u32,
    /// Nodes where the newest generation is Ready.
    #[serde(default)]
    pub ready_nodes: u32,
    /// Bytes of one copy of the pipeline.
    #[serde(default)]
    pub total_bytes: u64,
    /// `total_bytes` for people (`1.5 GiB`), shown by `kubectl get mw`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<String>,
    /// Generation digest of the resolved sources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Node label set where this wrapper is Ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_label: Option<String>,
    /// Ready, Progressing, Degraded. A map keyed by type, as metav1.Condition
    /// lists are: server-side apply merges them per condition.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

fn free_form_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn design_example_parses() {
        let yaml = r#"
apiVersion: zerocopy.dev/v1alpha1
kind: ModelWrapper
metadata: {name: bert, namespace: ml}
spec:
  mode: actor
  pipeline:
    components:
      - name: encoder
        weights: {uri: "https://host/bert/encoder.safetensors", sha256: "aa"}
        skeleton: {factory: "mypkg.models:Encoder", kwargs: {hidden: 768}}
      - name: decoder
        weights: {uri: "file:///mnt/models/decoder.safetensors"}
  nodeSelector: {ray.io/node-type: worker}
  memory: {hugePages: true}
"#;
        let mw: ModelWrapper = serde_yaml::from_str(yaml).unwrap();
        assert_eq!(mw.spec.mode, Mode::Actor);
        assert_eq!(mw.spec.pipeline.components.len(), 2);
        assert!(mw.spec.memory.huge_pages);
        let kwargs = mw.spec.pipeline.components[0]
            .skeleton
            .as_ref()
            .unwrap()
            .kwargs
            .as_ref()
            .unwrap();
        assert_eq!(kwargs["hidden"], 768);
    }

    #[test]
    fn mode_defaults_to_actor() {
        let spec: ModelWrapperSpec =
            serde_yaml::from_str("pipeline: {components: [{name: m, weights: {uri: 'file:///m.safetensors'}}]}")
                .unwrap();
        assert_eq!(spec.mode, Mode::Actor);
        assert!(spec.task.is_none());
    }
}
