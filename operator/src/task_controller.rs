//! The ModelTask controller: one Job per task (server-side apply, owner = the
//! task) once its wrapper is Ready somewhere; status mirrors the Job and its pod.
//! Reads come from the caches (Jobs and pods labelled with the task, wrappers);
//! a change of the task, its Job, its pods or its wrapper wakes it, and
//! [`RESYNC`] is only a fallback.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use zerocopy_api::labels::OPERATOR_MANAGER;
use zerocopy_api::{ModelTask, ModelTaskStatus};

use crate::context::{Context, Error};
use crate::task::{build_job, job_name, task_status, TASK_LABEL};

/// Re-check of a task that is still running without any event: a fallback,
/// since its Job, pods and wrapper wake it.
pub const RESYNC: Duration = Duration::from_secs(300);

pub async fn reconcile(t: Arc<ModelTask>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    if !ctx.caches.task_caches_ready.wait().await {
        return Err(Error::CacheStopped("Job, Pod or ModelWrapper"));
    }
    let result = reconcile_inner(&t, &ctx).await;
    ctx.metrics
        .reconcile_seconds
        .with_label_values(&["modeltask"])
        .observe(started.elapsed().as_secs_f64());
    ctx.metrics
        .reconciles
        .with_label_values(&["modeltask", if result.is_ok() { "ok" } else { "error" }])
        .inc();
    result
}

pub fn error_policy(_t: Arc<ModelTask>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(%error, "ModelTask reconcile failed; retrying");
    Action::requeue(Duration::from_secs(2))
}

async fn reconcile_inner(t: &ModelTask, ctx: &Context) -> Result<Action, Error> {
    let ns = t.namespace().ok_or(Error::NoNamespace)?;
    let name = t.name_any();
    let previous = t.status.clone();
    if matches!(
        previous.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    ) {
        return Ok(Action::await_change());
    }
    let now = Time(Timestamp::now());
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
    let jname = job_name(&name);
    let uid = t.uid().unwrap_or_default();
    let job = ctx
        .caches
        .jobs
        .get(&ObjectRef::new(&jname).within(&ns))
        .filter(|j| j.owner_references().iter().any(|o| o.uid == uid));
    let status = match job {
        Some(job) => {
            let pods: Vec<Pod> = ctx
                .caches
                .pods
                .state()
                .iter()
                .filter(|p| {
                    p.namespace().as_deref() == Some(ns.as_str())
                        && p.labels().get(TASK_LABEL).map(String::as_str) == Some(name.as_str())
                })
                .map(|p| (**p).clone())
                .collect();
            let pod = crate::task::outcome_pod(pods, job.uid().as_deref().unwrap_or_default());
            task_status(
                previous.as_ref(),
                None,
                Some(&job),
                pod.as_ref(),
                t.metadata.generation,
                &now,
            )
        }
        None => {
            let wrapper = ctx
                .caches
                .task_wrappers
                .get(&ObjectRef::new(&t.spec.wrapper).within(&ns))
                .and_then(|w| w.get().cloned());
            match build_job(t, wrapper.as_ref()) {
                Ok(job) => {
                    jobs.patch(
                        &jname,
                        &PatchParams::apply(OPERATOR_MANAGER).force(),
                        &Patch::Apply(&job),
                    )
                    .await?;
                    ctx.metrics.write("Job", "apply");
                    // The cache may not show the Job yet when the task's own
                    // status write wakes it again: one Event per Job.
                    if previous.as_ref().and_then(|s| s.job_name.as_deref()) != Some(jname.as_str()) {
                        publish(ctx, t, EventType::Normal, "JobCreated", format!("created Job {jname}")).await;
                    }
                    let mut s = previous.clone().unwrap_or_default();
                    s.phase = Some("Pending".into());
                    s.job_name = Some(jname.clone());
                    s
                }
                Err(blocked) => {
                    let s = task_status(
                        previous.as_ref(),
                        Some(&blocked),
                        None,
                        None,
                        t.metadata.generation,
                        &now,
                    );
                    if previous.as_ref() != Some(&s) && blocked.is_error() {
                        publish(ctx, t, EventType::Warning, blocked.reason(), blocked.to_string()).await;
                    }
                    s
                }
            }
        }
    };
    write_status(ctx, &ns, t, previous.as_ref(), status).await?;
    Ok(Action::requeue(RESYNC))
}

async fn write_status(
    ctx: &Context,
    ns: &str,
    t: &ModelTask,
    previous: Option<&ModelTaskStatus>,
    status: ModelTaskStatus,
) -> Result<(), Error> {
    if previous == Some(&status) {
        return Ok(());
    }
    ctx.apply_status::<ModelTask>(ns, &t.name_any(), &status).await?;
    if previous.and_then(|p| p.phase.clone()) != status.phase {
        if let Some(phase) = &status.phase {
            let kind = if phase == "Failed" {
                EventType::Warning
            } else {
                EventType::Normal
            };
            publish(ctx, t, kind, phase, format!("task is {phase}")).await;
        }
    }
    Ok(())
}

async fn publish(ctx: &Context, t: &ModelTask, type_: EventType, reason: &str, note: String) {
    let event = KubeEvent {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &t.object_ref(&())).await {
        tracing::warn!(error = %e, "could not record event");
    }
}
