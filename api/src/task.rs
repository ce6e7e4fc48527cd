//! `ModelTask`: one invocation of a task-mode ModelWrapper, run by the
//! operator as a Job on a node where the wrapper is Ready.

use k8s_openapi::api::core::v1::EnvVar;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One task: which wrapper, with what arguments and input.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "zerocopy.dev",
    version = "v1alpha1",
    kind = "ModelTask",
    namespaced,
    shortname = "mt",
    status = "ModelTaskStatus",
    printcolumn = r#"{"name":"Wrapper","type":"string","jsonPath":".spec.wrapper"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".status.nodeName"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self == oldSelf", "message": "a ModelTask is immutable: create a new one"}
]))]
#[serde(rename_all = "camelCase")]
pub struct ModelTaskSpec {
    /// A ModelWrapper in `mode: task`, in the same namespace.
    #[schemars(length(min = 1, max = 253))]
    pub wrapper: String,
    /// Arguments appended to the template's first container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Environment added to every container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// The task's input, given to the containers as `MODELTASK_INPUT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<TaskInput>,
    /// Seconds the Job may run before it is failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub active_deadline_seconds: Option<i64>,
    /// Retries before the task fails (default 0: a task runs once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 20))]
    pub backoff_limit: Option<i32>,
}

/// Inline text, or a key of a ConfigMap in the same namespace; exactly one.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.inline) != has(self.configMapRef)", "message": "input needs exactly one of inline and configMapRef"}
]))]
pub struct TaskInput {
    /// The input itself (at most 256 KiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 262144))]
    pub inline: Option<String>,
    /// A ConfigMap key holding the input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_ref: Option<ConfigMapKeyRef>,
}

/// `name` and `key` of a ConfigMap entry.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct ConfigMapKeyRef {
    /// ConfigMap name.
    pub name: String,
    /// Key in its `data`.
    pub key: String,
}

/// Observed state: mirrors the Job.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelTaskStatus {
    /// Waiting (no node Ready yet), Pending, Running, Succeeded or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// The Job running this task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_name: Option<String>,
    /// The node its pod ran on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// When the Job started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When it finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// The container's termination message (at most 4 KiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// Ready (the Job exists), Complete, Failed, with reasons. A map keyed by type, as metav1.Condition
    /// lists are: server-side apply merges them per condition.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}
