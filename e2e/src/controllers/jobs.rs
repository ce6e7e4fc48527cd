//! The Job controller: pods from the template (owner = the Job), up to
//! `parallelism` at a time until `completions` succeed; `backoffLimit` failed
//! pods or `activeDeadlineSeconds` fail the Job; Complete / Failed conditions.
//!
//! Not modelled: indexed completion mode, pod failure policies, success
//! policies, suspend, backoff delays between retries, pod-replacement policy,
//! the job-tracking finalizer, ttlSecondsAfterFinished.

use serde_json::{json, Value};
use tokio::sync::watch;

use super::events;
use crate::apiserver::selector::LabelSelector;
use crate::apiserver::store::{now, ListOptions, Propagation, Store, Sub};

/// What one pass decided for one Job: pure, so it is unit-tested.
#[derive(Debug, PartialEq)]
pub struct JobDecision {
    pub create: usize,
    /// Set when the Job finishes: (condition type, reason, message).
    pub finish: Option<(&'static str, &'static str, String)>,
    pub active: usize,
    pub succeeded: usize,
    pub failed: usize,
}

pub fn decide(job: &Value, pods: &[Value], elapsed_secs: Option<i64>) -> JobDecision {
    let phase = |p: &Value| p["status"]["phase"].as_str().unwrap_or("Pending").to_string();
    let succeeded = pods.iter().filter(|p| phase(p) == "Succeeded").count();
    let failed = pods.iter().filter(|p| phase(p) == "Failed").count();
    let active = pods
        .iter()
        .filter(|p| {
            !matches!(phase(p).as_str(), "Succeeded" | "Failed") && p["metadata"]["deletionTimestamp"].is_null()
        })
        .count();
    let spec = &job["spec"];
    let completions = spec["completions"].as_u64().unwrap_or(1) as usize;
    let parallelism = spec["parallelism"].as_u64().unwrap_or(1) as usize;
    let backoff_limit = spec["backoffLimit"].as_u64().unwrap_or(6) as usize;
    let mut d = JobDecision {
        create: 0,
        finish: None,
        active,
        succeeded,
        failed,
    };
    if succeeded >= completions {
        d.finish = Some((
            "Complete",
            "Completed",
            format!("Job completed: {succeeded}/{completions} pods succeeded"),
        ));
    } else if failed > backoff_limit {
        d.finish = Some((
            "Failed",
            "BackoffLimitExceeded",
            "Job has reached the specified backoff limit".to_string(),
        ));
    } else if let (Some(deadline), Some(elapsed)) = (spec["activeDeadlineSeconds"].as_i64(), elapsed_secs) {
        if elapsed >= deadline {
            d.finish = Some((
                "Failed",
                "DeadlineExceeded",
                "Job was active longer than specified deadline".to_string(),
            ));
        }
    }
    if d.finish.is_none() {
        let remaining = completions.saturating_sub(succeeded);
        d.create = parallelism.min(remaining).saturating_sub(active);
    }
    d
}

fn finished(job: &Value) -> bool {
    job["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| (c["type"] == "Complete" || c["type"] == "Failed") && c["status"] == "True")
}

fn pod_from_template(job: &Value) -> Value {
    let name = job["metadata"]["name"].as_str().unwrap_or("job");
    let uid = job["metadata"]["uid"].as_str().unwrap_or("");
    let mut pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": job["spec"]["template"]["metadata"].clone(),
        "spec": job["spec"]["template"]["spec"].clone(),
    });
    if !pod["metadata"].is_object() {
        pod["metadata"] = json!({});
    }
    pod["metadata"]["generateName"] = json!(format!("{name}-"));
    for (k, v) in [
        ("job-name", name),
        ("batch.kubernetes.io/job-name", name),
        ("controller-uid", uid),
        ("batch.kubernetes.io/controller-uid", uid),
    ] {
        pod["metadata"]["labels"][k] = json!(v);
    }
    pod["metadata"]["ownerReferences"] = json!([{
        "apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": uid,
        "controller": true, "blockOwnerDeletion": true,
    }]);
    pod
}

pub fn sync_once(store: &Store) {
    let (Ok(jobs_t), Ok(pods_t)) = (store.resource_type("batch", "jobs"), store.resource_type("", "pods")) else {
        return;
    };
    let Ok((jobs, _, _)) = store.list(&jobs_t, None, &ListOptions::default()) else {
        return;
    };
    for job in jobs
        .iter()
        .filter(|j| !finished(j) && j["metadata"]["deletionTimestamp"].is_null())
    {
        let ns = job["metadata"]["namespace"].as_str().unwrap_or("");
        let name = job["metadata"]["name"].as_str().unwrap_or("");
        let uid = job["metadata"]["uid"].as_str().unwrap_or("");
        let opts = ListOptions {
            labels: LabelSelector::parse(&format!("controller-uid={uid}")).unwrap_or_default(),
            ..Default::default()
        };
        let Ok((pods, _, _)) = store.list(&pods_t, Some(ns), &opts) else {
            continue;
        };
        let start = job["status"]["startTime"]
            .as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
        let elapsed = start.map(|s| (chrono::Utc::now() - s.with_timezone(&chrono::Utc)).num_seconds());
        let d = decide(job, &pods, elapsed);
        for _ in 0..d.create {
            match store.create(&pods_t, ns, pod_from_template(job)) {
                Ok(p) => events::record(
                    store,
                    job,
                    "Normal",
                    "SuccessfulCreate",
                    &format!("Created pod: {}", p["metadata"]["name"].as_str().unwrap_or("")),
                    "job-controller",
                ),
                Err(e) => events::record(
                    store,
                    job,
                    "Warning",
                    "FailedCreate",
                    &format!("Error creating: {}", e.message),
                    "job-controller",
                ),
            }
        }
        let active = d.active + d.create;
        let _ = store.modify(&jobs_t, ns, name, Sub::Status, |j| {
            if j["status"]["startTime"].is_null() {
                j["status"]["startTime"] = json!(now());
            }
            j["status"]["active"] = json!(if d.finish.is_some() { 0 } else { active });
            j["status"]["succeeded"] = json!(d.succeeded);
            j["status"]["failed"] = json!(d.failed);
            if let Some((type_, reason, message)) = &d.finish {
                let ts = now();
                j["status"]["conditions"] = json!([{"type": type_, "status": "True", "reason": reason, "message": message,
                    "lastProbeTime": ts, "lastTransitionTime": ts}]);
                if *type_ == "Complete" {
                    j["status"]["completionTime"] = json!(ts);
                }
            }
        });
        if let Some((type_, reason, message)) = &d.finish {
            if *type_ == "Failed" {
                // Active pods of a failed Job are stopped.
                for p in pods
                    .iter()
                    .filter(|p| !matches!(p["status"]["phase"].as_str(), Some("Succeeded" | "Failed")))
                {
                    let pname = p["metadata"]["name"].as_str().unwrap_or("");
                    let _ = store.delete(&pods_t, ns, pname, Some(Propagation::Background), false, None);
                }
            }
            events::record(
                store,
                job,
                if *type_ == "Complete" { "Normal" } else { "Warning" },
                if *type_ == "Complete" { "Completed" } else { reason },
                message,
                "job-controller",
            );
        }
    }
}

pub async fn run(store: Store, shutdown: watch::Receiver<bool>) {
    super::run_on_changes(store, shutdown, sync_once).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(phase: &str) -> Value {
        json!({"metadata": {}, "status": {"phase": phase}})
    }

    #[test]
    fn creates_up_to_parallelism_and_completes() {
        let job = json!({"spec": {"completions": 3, "parallelism": 2, "backoffLimit": 1}});
        assert_eq!(decide(&job, &[], None).create, 2);
        assert_eq!(decide(&job, &[pod("Succeeded"), pod("Running")], None).create, 1);
        assert_eq!(
            decide(&job, &[pod("Succeeded"), pod("Succeeded"), pod("Running")], None).create,
            0
        );
        let done = decide(&job, &[pod("Succeeded"), pod("Succeeded"), pod("Succeeded")], None);
        assert_eq!(done.finish.unwrap().0, "Complete");
    }

    #[test]
    fn backoff_limit_and_deadline_fail_the_job() {
        let job = json!({"spec": {"completions": 1, "parallelism": 1, "backoffLimit": 1, "activeDeadlineSeconds": 10}});
        assert_eq!(decide(&job, &[pod("Failed")], None).create, 1, "one retry allowed");
        assert_eq!(
            decide(&job, &[pod("Failed"), pod("Failed")], None).finish.unwrap().1,
            "BackoffLimitExceeded"
        );
        assert_eq!(
            decide(&job, &[pod("Running")], Some(11)).finish.unwrap().1,
            "DeadlineExceeded"
        );
    }
}
