//! Task mode, pure parts: the Job a ModelTask runs as, and the task's status
//! from that Job and its pod.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Affinity, CSIVolumeSource, ConfigMapKeySelector, EnvVar, EnvVarSource, NodeAffinity, NodeSelector,
    NodeSelectorRequirement, NodeSelectorTerm, Pod, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use kube::{Resource, ResourceExt};
use zerocopy_api::labels::{
    ready_label, CSI_DRIVER, PATH_ENV, TASK_INPUT_ENV, TASK_NAME_ENV, VOLUME_ATTRIBUTE_WRAPPER,
};
use zerocopy_api::spec::Mode;
use zerocopy_api::{ModelTask, ModelTaskStatus, ModelWrapper};

use crate::status::{condition, set_condition};

/// Label on a task's Job and pods naming the task.
pub const TASK_LABEL: &str = "zerocopy.dev/task";
const VOLUME_NAME: &str = "zerocopy-model";
/// Termination messages are cut here, as kubelet does.
pub const OUTPUT_LIMIT: usize = 4096;

/// Why a task cannot start (yet).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TaskBlocked {
    #[error("ModelWrapper {0:?} does not exist in this namespace")]
    WrapperNotFound(String),
    #[error("ModelWrapper {0:?} is in actor mode; ModelTasks need a wrapper with mode: task")]
    NotTaskMode(String),
    #[error("ModelWrapper {0:?} has no spec.task.template")]
    NoTemplate(String),
    #[error("waiting for ModelWrapper {0:?} to be Ready on some node")]
    NotReadyAnywhere(String),
}

impl TaskBlocked {
    pub fn reason(&self) -> &'static str {
        match self {
            TaskBlocked::WrapperNotFound(_) => "WrapperNotFound",
            TaskBlocked::NotTaskMode(_) => "WrapperNotTaskMode",
            TaskBlocked::NoTemplate(_) => "NoTaskTemplate",
            TaskBlocked::NotReadyAnywhere(_) => "WaitingForReadyNode",
        }
    }

    /// Errors a user must fix, as opposed to waiting.
    pub fn is_error(&self) -> bool {
        !matches!(self, TaskBlocked::NotReadyAnywhere(_))
    }
}

/// The Job's name: the task's, shortened with a digest when too long for the
/// `job-name` pod label.
pub fn job_name(task: &str) -> String {
    if task.len() <= 52 {
        return task.to_string();
    }
    let sum: u32 = task
        .bytes()
        .fold(2166136261u32, |h, b| (h ^ b as u32).wrapping_mul(16777619));
    format!("{}-{:08x}", &task[..43].trim_end_matches(['-', '.']), sum)
}

/// The Job for `task`, or why it cannot run yet.
pub fn build_job(task: &ModelTask, wrapper: Option<&ModelWrapper>) -> Result<Job, TaskBlocked> {
    let wname = task.spec.wrapper.clone();
    let wrapper = wrapper.ok_or_else(|| TaskBlocked::WrapperNotFound(wname.clone()))?;
    if wrapper.spec.mode != Mode::Task {
        return Err(TaskBlocked::NotTaskMode(wname));
    }
    let template = wrapper
        .spec
        .task
        .as_ref()
        .map(|t| t.template.clone())
        .ok_or_else(|| TaskBlocked::NoTemplate(wname.clone()))?;
    let ready_nodes = wrapper.status.as_ref().map_or(0, |s| s.ready_nodes);
    if ready_nodes == 0 {
        return Err(TaskBlocked::NotReadyAnywhere(wname));
    }
    let ns = task.namespace().unwrap_or_default();
    let label = ready_label(&ns, &wrapper.name_any());
    let mount_path = format!("/models/{wname}");

    let mut template = template;
    let mut pod_spec = template.spec.take().unwrap_or_default();
    // Next to the weights: only nodes where the wrapper is Ready.
    let requirement = NodeSelectorRequirement {
        key: label,
        operator: "Exists".into(),
        values: None,
    };
    let affinity = pod_spec.affinity.get_or_insert_with(Affinity::default);
    let node_affinity = affinity.node_affinity.get_or_insert_with(NodeAffinity::default);
    let required = node_affinity
        .required_during_scheduling_ignored_during_execution
        .get_or_insert_with(|| NodeSelector {
            node_selector_terms: vec![],
        });
    if required.node_selector_terms.is_empty() {
        required.node_selector_terms.push(NodeSelectorTerm::default());
    }
    for term in &mut required.node_selector_terms {
        term.match_expressions
            .get_or_insert_with(Vec::new)
            .push(requirement.clone());
    }
    if pod_spec.restart_policy.as_deref().is_none_or(|p| p == "Always") {
        pod_spec.restart_policy = Some("Never".into());
    }
    pod_spec.volumes.get_or_insert_with(Vec::new).push(Volume {
        name: VOLUME_NAME.into(),
        csi: Some(CSIVolumeSource {
            driver: CSI_DRIVER.into(),
            read_only: Some(true),
            volume_attributes: Some(BTreeMap::from([(VOLUME_ATTRIBUTE_WRAPPER.to_string(), wname.clone())])),
            ..Default::default()
        }),
        ..Default::default()
    });
    let mut env = vec![
        EnvVar {
            name: PATH_ENV.into(),
            value: Some(mount_path.clone()),
            value_from: None,
        },
        EnvVar {
            name: TASK_NAME_ENV.into(),
            value: Some(task.name_any()),
            value_from: None,
        },
    ];
    match &task.spec.input {
        Some(input) if input.inline.is_some() => env.push(EnvVar {
            name: TASK_INPUT_ENV.into(),
            value: input.inline.clone(),
            value_from: None,
        }),
        Some(input) => {
            if let Some(r) = &input.config_map_ref {
                env.push(EnvVar {
                    name: TASK_INPUT_ENV.into(),
                    value: None,
                    value_from: Some(EnvVarSource {
                        config_map_key_ref: Some(ConfigMapKeySelector {
                            name: r.name.clone(),
                            key: r.key.clone(),
                            optional: None,
                        }),
                        ..Default::default()
                    }),
                })
            }
        }
        None => {}
    }
    env.extend(task.spec.env.iter().cloned());
    for (i, c) in pod_spec.containers.iter_mut().enumerate() {
        c.volume_mounts.get_or_insert_with(Vec::new).push(VolumeMount {
            name: VOLUME_NAME.into(),
            mount_path: mount_path.clone(),
            read_only: Some(true),
            ..Default::default()
        });
        let existing = c.env.get_or_insert_with(Vec::new);
        existing.retain(|e| !env.iter().any(|n| n.name == e.name));
        existing.extend(env.iter().cloned());
        if i == 0 && !task.spec.args.is_empty() {
            c.args
                .get_or_insert_with(Vec::new)
                .extend(task.spec.args.iter().cloned());
        }
        if c.termination_message_policy.is_none() {
            c.termination_message_policy = Some("FallbackToLogsOnError".into());
        }
    }
    template.spec = Some(pod_spec);
    let labels = BTreeMap::from([
        (TASK_LABEL.to_string(), task.name_any()),
        (zerocopy_api::labels::WRAPPER_LABEL.to_string(), wname.clone()),
    ]);
    let meta = template.metadata.get_or_insert_with(ObjectMeta::default);
    meta.labels.get_or_insert_with(BTreeMap::new).extend(labels.clone());
    Ok(Job {
        metadata: ObjectMeta {
            name: Some(job_name(&task.name_any())),
            namespace: Some(ns),
            labels: Some(labels),
            owner_references: owner_ref(task).map(|o| vec![o]),
            ..Default::default()
        },
        spec: Some(JobSpec {
            backoff_limit: Some(task.spec.backoff_limit.unwrap_or(0)),
            active_deadline_seconds: task.spec.active_deadline_seconds,
            template,
            ..Default::default()
        }),
        status: None,
    })
}

fn owner_ref(task: &ModelTask) -> Option<OwnerReference> {
    task.controller_owner_ref(&())
}

fn job_condition(job: &Job, type_: &str) -> Option<(Option<String>, Option<String>)> {
    job.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_ && c.status == "True")
        .map(|c| (c.reason.clone(), c.message.clone()))
}

/// The pod whose termination message becomes the task's output: the newest
/// one **the Job controls** (ownerReference with `controller: true` and the
/// Job's uid). The task label alone is not proof: anyone who can create pods
/// in the namespace can label one, and must not be able to forge the output.
pub fn outcome_pod(pods: Vec<Pod>, job_uid: &str) -> Option<Pod> {
    pods.into_iter()
        .filter(|p| {
            !job_uid.is_empty()
                && p.owner_references()
                    .iter()
                    .any(|o| o.controller == Some(true) && o.kind == "Job" && o.uid == job_uid)
        })
        .max_by_key(|p| p.metadata.creation_timestamp.clone())
}

/// The task's status: blocked, or mirroring its Job and pod.
pub fn task_status(
    previous: Option<&ModelTaskStatus>,
    blocked: Option<&TaskBlocked>,
    job: Option<&Job>,
    pod: Option<&Pod>,
    generation: Option<i64>,
    now: &Time,
) -> ModelTaskStatus {
    let mut s = previous.cloned().unwrap_or_default();
    if let Some(b) = blocked {
        s.phase = Some("Waiting".into());
        set_condition(
            &mut s.conditions,
            condition("Ready", false, b.reason(), b.to_string(), generation, now),
        );
        return s;
    }
    let Some(job) = job else { return s };
    s.job_name = job.metadata.name.clone();
    let js = job.status.clone().unwrap_or_default();
    s.start_time = js.start_time.clone().or(s.start_time);
    let pod_status = pod.and_then(|p| p.status.as_ref());
    if let Some(node) = pod.and_then(|p| p.spec.as_ref()).and_then(|s| s.node_name.clone()) {
        s.node_name = Some(node);
    }
    let terminated = pod_status
        .and_then(|ps| ps.container_statuses.as_ref())
        .and_then(|cs| cs.first())
        .and_then(|c| c.state.as_ref())
        .and_then(|st| st.terminated.clone());
    if let Some(t) = &terminated {
        let mut out = t.message.clone().unwrap_or_default();
        if out.len() > OUTPUT_LIMIT {
            let mut cut = OUTPUT_LIMIT;
            while !out.is_char_boundary(cut) {
                cut -= 1;
            }
            out.truncate(cut);
        }
        s.output = Some(out);
    }
    set_condition(
        &mut s.conditions,
        condition(
            "Ready",
            true,
            "JobCreated",
            format!("running as Job {}", s.job_name.clone().unwrap_or_default()),
            generation,
            now,
        ),
    );
    if let Some((reason, message)) = job_condition(job, "Complete") {
        s.phase = Some("Succeeded".into());
        s.completion_time = js.completion_time.clone().or(Some(now.clone()));
        set_condition(
            &mut s.conditions,
            condition(
                "Complete",
                true,
                reason.as_deref().unwrap_or("Completed"),
                message.unwrap_or_default(),
                generation,
                now,
            ),
        );
    } else if let Some((reason, message)) = job_condition(job, "Failed") {
        s.phase = Some("Failed".into());
        s.completion_time = s.completion_time.or(Some(now.clone()));
        let exit = terminated
            .as_ref()
            .map(|t| format!(" (exit code {})", t.exit_code))
            .unwrap_or_default();
        set_condition(
            &mut s.conditions,
            condition(
                "Failed",
                true,
                reason.as_deref().unwrap_or("Failed"),
                format!("{}{exit}", message.unwrap_or_default()),
                generation,
                now,
            ),
        );
    } else {
        let running = pod_status.and_then(|p| p.phase.as_deref()) == Some("Running");
        s.phase = Some(if running { "Running" } else { "Pending" }.into());
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::PodTemplateSpec;
    use zerocopy_api::spec::{ComponentSpec, PipelineSpec, SourceSpec, TaskSpec};
    use zerocopy_api::task::{ModelTaskSpec, TaskInput};
    use zerocopy_api::{ModelWrapperSpec, ModelWrapperStatus};

    fn wrapper(mode: Mode, ready: u32) -> ModelWrapper {
        let template: PodTemplateSpec = serde_json::from_value(serde_json::json!({
            "spec": {"containers": [{"name": "run", "image": "py", "command": ["python3", "task.py"], "env": [{"name": "MODELWRAPPER_PATH", "value": "stale"}]}],
                     "nodeSelector": {"pool": "gpu"}}
        }))
        .unwrap();
        let mut w = ModelWrapper::new(
            "bert",
            ModelWrapperSpec {
                mode,
                pipeline: PipelineSpec {
                    components: vec![ComponentSpec {
                        name: "m".into(),
                        weights: Some(SourceSpec {
                            uri: "file:///m".into(),
                            sha256: None,
                        }),
                        source: None,
                        skeleton: None,
                    }],
                    skeleton: None,
                },
                node_selector: Default::default(),
                placement: Default::default(),
                memory: Default::default(),
                task: Some(TaskSpec { template }),
            },
        );
        w.metadata.namespace = Some("ml".into());
        w.status = Some(ModelWrapperStatus {
            ready_nodes: ready,
            ..Default::default()
        });
        w
    }

    fn task(input: Option<TaskInput>) -> ModelTask {
        let mut t = ModelTask::new(
            "t1",
            ModelTaskSpec {
                wrapper: "bert".into(),
                args: vec!["--n".into(), "3".into()],
                env: vec![],
                input,
                active_deadline_seconds: Some(60),
                backoff_limit: None,
            },
        );
        t.metadata.namespace = Some("ml".into());
        t.metadata.uid = Some("uid-1".into());
        t
    }

    #[test]
    fn the_job_mounts_the_volume_and_requires_a_ready_node() {
        let job = build_job(
            &task(Some(TaskInput {
                inline: Some("hello".into()),
                config_map_ref: None,
            })),
            Some(&wrapper(Mode::Task, 1)),
        )
        .unwrap();
        assert_eq!(job.metadata.name.as_deref(), Some("t1"));
        assert_eq!(job.metadata.owner_references.as_ref().unwrap()[0].kind, "ModelTask");
        let spec = job.spec.unwrap();
        assert_eq!(
            spec.backoff_limit,
            Some(0),
            "a task runs once unless it asks for retries"
        );
        assert_eq!(spec.active_deadline_seconds, Some(60));
        let pod = spec.template.spec.unwrap();
        assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
        assert_eq!(
            pod.node_selector.unwrap()["pool"],
            "gpu",
            "the template's own constraints stay"
        );
        let term = &pod
            .affinity
            .unwrap()
            .node_affinity
            .unwrap()
            .required_during_scheduling_ignored_during_execution
            .unwrap()
            .node_selector_terms[0];
        assert_eq!(
            term.match_expressions.as_ref().unwrap()[0].key,
            "ready.zerocopy.dev/ml.bert"
        );
        let vol = &pod.volumes.unwrap()[0];
        assert_eq!(
            vol.csi.as_ref().unwrap().volume_attributes.as_ref().unwrap()["modelWrapper"],
            "bert"
        );
        let c = &pod.containers[0];
        assert_eq!(c.volume_mounts.as_ref().unwrap()[0].mount_path, "/models/bert");
        let env: BTreeMap<_, _> = c
            .env
            .as_ref()
            .unwrap()
            .iter()
            .map(|e| (e.name.clone(), e.value.clone()))
            .collect();
        assert_eq!(
            env["MODELWRAPPER_PATH"].as_deref(),
            Some("/models/bert"),
            "the operator's value replaces the template's"
        );
        assert_eq!(env["MODELTASK_INPUT"].as_deref(), Some("hello"));
        assert_eq!(c.args.as_ref().unwrap(), &vec!["--n".to_string(), "3".to_string()]);
    }

    #[test]
    fn blocked_until_the_wrapper_is_usable() {
        assert_eq!(build_job(&task(None), None).unwrap_err().reason(), "WrapperNotFound");
        assert_eq!(
            build_job(&task(None), Some(&wrapper(Mode::Actor, 1)))
                .unwrap_err()
                .reason(),
            "WrapperNotTaskMode"
        );
        let waiting = build_job(&task(None), Some(&wrapper(Mode::Task, 0))).unwrap_err();
        assert!(!waiting.is_error());
        let s = task_status(
            None,
            Some(&waiting),
            None,
            None,
            Some(1),
            &Time(k8s_openapi::jiff::Timestamp::now()),
        );
        assert_eq!(s.phase.as_deref(), Some("Waiting"));
        assert_eq!(
            s.conditions[0].message,
            "waiting for ModelWrapper \"bert\" to be Ready on some node"
        );
    }

    #[test]
    fn status_mirrors_the_job_and_pod() {
        let job: Job = serde_json::from_value(serde_json::json!({"metadata": {"name": "t1"}, "status": {
            "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"}]}}))
        .unwrap();
        let pod: Pod = serde_json::from_value(
            serde_json::json!({"spec": {"nodeName": "n1", "containers": []}, "status": {"phase": "Failed",
            "containerStatuses": [{"name": "run", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": 2, "message": "boom"}}}]}}),
        )
        .unwrap();
        let s = task_status(
            None,
            None,
            Some(&job),
            Some(&pod),
            Some(1),
            &Time(k8s_openapi::jiff::Timestamp::now()),
        );
        assert_eq!(s.phase.as_deref(), Some("Failed"));
        assert_eq!(s.node_name.as_deref(), Some("n1"));
        assert_eq!(s.output.as_deref(), Some("boom"));
        let failed = s.conditions.iter().find(|c| c.type_ == "Failed").unwrap();
        assert!(failed.message.ends_with("(exit code 2)"), "{}", failed.message);
    }

    #[test]
    fn long_task_names_give_valid_job_names() {
        let long = "t".repeat(70);
        let n = job_name(&long);
        assert!(n.len() <= 52, "{n}");
        assert_ne!(n, job_name(&"t".repeat(71)));
    }

    #[test]
    fn only_the_jobs_own_pods_tell_the_outcome() {
        let pod = |name: &str, owner_uid: Option<&str>, created: &str| -> Pod {
            let mut p = serde_json::json!({"metadata": {"name": name, "creationTimestamp": created, "labels": {"zerocopy.dev/task": "t"}}});
            if let Some(uid) = owner_uid {
                p["metadata"]["ownerReferences"] = serde_json::json!([{"apiVersion": "batch/v1", "kind": "Job", "name": "t", "uid": uid, "controller": true}]);
            }
            serde_json::from_value(p).unwrap()
        };
        let pods = vec![
            pod("real", Some("job-uid"), "2026-01-01T00:00:00Z"),
            // Newer, labelled like the task's pods, but not the Job's: forged.
            pod("forged", None, "2026-01-01T00:01:00Z"),
            pod("other-job", Some("other"), "2026-01-01T00:02:00Z"),
        ];
        assert_eq!(
            outcome_pod(pods.clone(), "job-uid")
                .and_then(|p| p.metadata.name)
                .as_deref(),
            Some("real")
        );
        assert!(outcome_pod(pods, "").is_none());
    }
}
