//! Task mode end to end: ModelTask → Job → pod on a node where the wrapper is
//! Ready → Succeeded with the output in status; failures carry their message;
//! a task for a wrapper that is not Ready yet waits, then runs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, PostParams};
use serde_json::json;
use support::*;
use zerocopy_api::{ModelTask, ModelWrapper};
use zerocopy_e2e::NodeSpec;

fn task(name: &str, wrapper: &str, args: &[&str], input: Option<&str>) -> ModelTask {
    let mut t = json!({"apiVersion": "zerocopy.dev/v1alpha1", "kind": "ModelTask", "metadata": {"name": name, "namespace": NS},
        "spec": {"wrapper": wrapper, "args": args}});
    if let Some(i) = input {
        t["spec"]["input"] = json!({"inline": i});
    }
    serde_json::from_value(t).unwrap()
}

async fn finished(tasks: &Api<ModelTask>, name: &str) -> Option<zerocopy_api::ModelTaskStatus> {
    let s = tasks.get(name).await.ok()?.status?;
    matches!(s.phase.as_deref(), Some("Succeeded" | "Failed")).then_some(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_run_as_jobs_next_to_the_weights() {
    let env = Env::start(
        vec![
            NodeSpec::new("node-1").label("pool", "gpu"),
            NodeSpec::new("node-2").label("pool", "cpu"),
        ],
        1,
    )
    .await;
    let (src, sha, _) = model(&env.cluster.dir, "m.safetensors", 4096, 3);
    // The template's command reads the manifest from the mounted volume and
    // echoes the input: the output proves where it ran and what it saw.
    let template = json!({"spec": {"containers": [{"name": "run", "image": "python:3.11", "command": ["sh", "-c",
        "test -f \"$MODELWRAPPER_PATH/manifest.json\" || exit 7; \
         printf '%s:%s:%s' \"$MODELTASK_INPUT\" \"$1\" \"$(grep -o '\"name\": *\"enc\"' \"$MODELWRAPPER_PATH/manifest.json\" | head -1 | tr -d ' \"')\" > /dev/termination-log; \
         [ \"$1\" != fail ] || { echo 'model said no' >&2; exit 3; }", "sh"]}]}});
    let wrappers: Api<ModelWrapper> = Api::namespaced(env.client.clone(), NS);
    let tasks: Api<ModelTask> = Api::namespaced(env.client.clone(), NS);

    // A task for a wrapper that does not exist yet waits with a condition that says so.
    tasks
        .create(&PostParams::default(), &task("early", "bert", &["ok"], Some("first")))
        .await
        .unwrap();
    let waiting = wait_for("early to wait", 120, || async {
        let s = tasks.get("early").await.ok()?.status?;
        (s.phase.as_deref() == Some("Waiting")).then_some(s)
    })
    .await;
    assert_eq!(waiting.conditions[0].reason, "WrapperNotFound");

    wrappers
        .create(
            &PostParams::default(),
            &serde_json::from_value(wrapper("bert", &src, &sha, json!({"pool": "gpu"}), Some(template))).unwrap(),
        )
        .await
        .unwrap();
    // Once the wrapper is Ready on node-1, the waiting task runs there.
    let done = wait_for("early to finish", 300, || finished(&tasks, "early")).await;
    assert_eq!(done.phase.as_deref(), Some("Succeeded"), "{done:?}");
    assert_eq!(done.node_name.as_deref(), Some("node-1"), "only node-1 has the weights");
    assert_eq!(done.output.as_deref(), Some("first:ok:name:enc"));
    assert!(done.completion_time.is_some() && done.start_time.is_some());
    let jobs: Api<Job> = Api::namespaced(env.client.clone(), NS);
    let job = jobs.get(done.job_name.as_deref().unwrap()).await.unwrap();
    assert_eq!(job.metadata.owner_references.unwrap()[0].kind, "ModelTask");

    // A failing command: Failed, with its message and exit code.
    tasks
        .create(&PostParams::default(), &task("bad", "bert", &["fail"], Some("x")))
        .await
        .unwrap();
    let failed = wait_for("bad to fail", 180, || finished(&tasks, "bad")).await;
    assert_eq!(failed.phase.as_deref(), Some("Failed"));
    assert_eq!(failed.output.as_deref(), Some("x:fail:name:enc"));
    let cond = failed.conditions.iter().find(|c| c.type_ == "Failed").unwrap();
    assert_eq!(cond.reason, "BackoffLimitExceeded");
    assert!(cond.message.ends_with("(exit code 3)"), "{}", cond.message);

    // A wrapper in actor mode cannot run tasks: an error condition, no Job.
    let (src2, sha2, _) = model(&env.cluster.dir, "a.safetensors", 1024, 4);
    wrappers
        .create(
            &PostParams::default(),
            &serde_json::from_value(wrapper("actor", &src2, &sha2, json!({}), None)).unwrap(),
        )
        .await
        .unwrap();
    tasks
        .create(&PostParams::default(), &task("wrong", "actor", &[], None))
        .await
        .unwrap();
    let wrong = wait_for("wrong to report the mode", 120, || async {
        let s = tasks.get("wrong").await.ok()?.status?;
        s.conditions.iter().find(|c| c.reason == "WrapperNotTaskMode").cloned()
    })
    .await;
    assert!(wrong.message.contains("actor mode"), "{}", wrong.message);
    assert!(jobs.get_opt("wrong").await.unwrap().is_none());
    env.stop().await;
}
