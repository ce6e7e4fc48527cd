//! The simulated cluster end to end: scheduler, Job controller, and a
//! simulated kubelet that mounts a real agent's CSI volume into a real
//! process.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Event, Namespace, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;
use zerocopy_e2e::{wait_for, AgentMode, Cluster, ClusterOptions, NodeSpec};
use zerocopy_integration_tests::safetensors::{file, T};
use zerocopy_integration_tests::{agent_bin, sha256_hex};

async fn pod_phase(pods: &Api<Pod>, name: &str) -> Option<String> {
    pods.get(name).await.ok()?.status?.phase
}

fn mounts_under(dir: &std::path::Path) -> usize {
    zerocopy_node_agent::mount::mounts()
        .unwrap()
        .into_iter()
        .filter(|m| m.mount_point.starts_with(dir))
        .count()
}

fn pod(name: &str, node_selector: serde_json::Value, command: &[&str], restart: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": restart,
            "nodeSelector": node_selector,
            "containers": [{
                "name": "main", "image": "python:3.11",
                "command": command,
                "env": [{"name": "MODELWRAPPER_PATH", "value": "/models/m"},
                        {"name": "MY_NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
                "volumeMounts": [{"name": "weights", "mountPath": "/models/m", "readOnly": true}]
            }],
            "volumes": [{"name": "weights", "csi": {"driver": "csi.zerocopy.dev", "readOnly": true,
                "volumeAttributes": {"modelWrapper": "m"}}}]
        }
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_mounts_a_real_agents_volume_and_deleting_it_unpublishes() {
    let cluster = Cluster::start(
        ClusterOptions::with_nodes(vec![
            NodeSpec::new("gpu-1").label("zerocopy", "yes"),
            NodeSpec::new("cpu-1").without_agent(),
        ])
        .agent(agent_bin(), AgentMode::Standalone),
    )
    .await
    .unwrap();
    let client = cluster.client().await.unwrap();
    let nss: Api<Namespace> = Api::all(client.clone());
    nss.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "test"}})).unwrap(),
    )
    .await
    .unwrap();

    // The wrapper lives on gpu-1's agent (standalone-backed node).
    let dirs = cluster.node_dirs("gpu-1").unwrap();
    let body = file(&[T::f32("w", 4096, 7)]);
    let src = cluster.dir.join("m.safetensors");
    std::fs::write(&src, &body).unwrap();
    std::fs::write(
        dirs.wrappers.join("m.yaml"),
        format!(
            "apiVersion: zerocopy.dev/v1alpha1\nkind: ModelWrapper\nmetadata: {{name: m, namespace: test}}\nspec:\n  pipeline:\n    components:\n      - name: enc\n        weights: {{uri: 'file://{}', sha256: '{}'}}\n",
            src.display(),
            sha256_hex(&body)
        ),
    )
    .unwrap();

    let pods: Api<Pod> = Api::namespaced(client.clone(), "test");
    let script = "import json, os; m = json.load(open(os.environ['MODELWRAPPER_PATH'] + '/manifest.json')); \
                  c = m['components'][0]['weights']; print(m['name'], c['sha256'], os.environ['MY_NODE']); \
                  open('/dev/termination-log', 'w').write(c['sha256'])";
    pods.create(
        &PostParams::default(),
        &pod(
            "reader",
            json!({"zerocopy": "yes"}),
            &["python3", "-c", script],
            "Never",
        ),
    )
    .await
    .unwrap();
    wait_for("reader to succeed", 180, || async {
        (pod_phase(&pods, "reader").await.as_deref() == Some("Succeeded")).then_some(())
    })
    .await;
    let reader = pods.get("reader").await.unwrap();
    assert_eq!(reader.spec.unwrap().node_name.as_deref(), Some("gpu-1"));
    let state = reader.status.unwrap().container_statuses.unwrap()[0]
        .state
        .clone()
        .unwrap();
    let terminated = state.terminated.unwrap();
    assert_eq!(terminated.exit_code, 0);
    assert_eq!(
        terminated.message.as_deref(),
        Some(sha256_hex(&body).as_str()),
        "the termination message carries the digest read from the volume"
    );
    let log = cluster.pod_log("test", "reader", "main").unwrap();
    assert_eq!(log.trim(), format!("m {} gpu-1", sha256_hex(&body)));
    // The same through the API, as `kubectl logs` reads it.
    let via_api = pods.logs("reader", &kube::api::LogParams::default()).await.unwrap();
    assert_eq!(via_api, log);
    // A finished pod's volume is torn down by its kubelet.
    wait_for("the finished pod's volume to be unpublished", 60, || async {
        (mounts_under(&dirs.kubelet) == 0).then_some(())
    })
    .await;

    // A long-running pod keeps its mount until it is deleted.
    pods.create(
        &PostParams::default(),
        &pod("sleeper", json!({"zerocopy": "yes"}), &["sleep", "300"], "Always"),
    )
    .await
    .unwrap();
    wait_for("sleeper to run", 120, || async {
        (pod_phase(&pods, "sleeper").await.as_deref() == Some("Running")).then_some(())
    })
    .await;
    assert_eq!(
        mounts_under(&dirs.kubelet),
        1,
        "one publication at the pod's target path"
    );
    pods.delete("sleeper", &DeleteParams::default()).await.unwrap();
    wait_for("sleeper to be gone", 120, || async {
        pods.get("sleeper").await.is_err().then_some(())
    })
    .await;
    assert_eq!(
        mounts_under(&dirs.kubelet),
        0,
        "deleting the pod unpublished its volume"
    );

    // A wrapper the agent does not have: FailedMount events with the driver's message, pod stays Pending.
    let mut missing = pod("missing", json!({"zerocopy": "yes"}), &["true"], "Never");
    missing.spec.as_mut().unwrap().volumes.as_mut().unwrap()[0]
        .csi
        .as_mut()
        .unwrap()
        .volume_attributes = Some([("modelWrapper".to_string(), "nope".to_string())].into());
    pods.create(&PostParams::default(), &missing).await.unwrap();
    let events: Api<Event> = Api::namespaced(client.clone(), "test");
    let message = wait_for("a FailedMount event", 120, || async {
        let list = events
            .list(&ListParams::default().fields("involvedObject.name=missing"))
            .await
            .ok()?;
        list.items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("FailedMount"))
            .and_then(|e| e.message)
    })
    .await;
    assert!(message.contains("NotFound") && message.contains("nope"), "{message}");
    assert_eq!(pod_phase(&pods, "missing").await.as_deref(), Some("Pending"));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_and_job_controller() {
    let cluster = Cluster::start(ClusterOptions::with_nodes(vec![
        NodeSpec::new("a").label("pool", "x"),
        NodeSpec::new("b")
            .label("pool", "y")
            .taint("dedicated", "ray", "NoSchedule"),
    ]))
    .await
    .unwrap();
    let client = cluster.client().await.unwrap();
    let jobs: Api<Job> = Api::default_namespaced(client.clone());
    let pods: Api<Pod> = Api::default_namespaced(client.clone());

    let job = |name: &str, cmd: &str, completions: i32, backoff: i32| -> Job {
        serde_json::from_value(json!({
            "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
            "spec": {"completions": completions, "backoffLimit": backoff, "template": {"spec": {
                "restartPolicy": "Never",
                "containers": [{"name": "c", "image": "busybox", "command": ["sh", "-c", cmd]}]}}}
        }))
        .unwrap()
    };
    jobs.create(
        &PostParams::default(),
        &job("ok", "echo -n done > /dev/termination-log", 2, 0),
    )
    .await
    .unwrap();
    let done = wait_for("job ok to complete", 120, || async {
        let j = jobs.get("ok").await.ok()?;
        let conds = j.status.clone()?.conditions?;
        conds
            .iter()
            .any(|c| c.type_ == "Complete" && c.status == "True")
            .then_some(j)
    })
    .await;
    assert_eq!(done.status.unwrap().succeeded, Some(2));
    let owned = pods.list(&ListParams::default().labels("job-name=ok")).await.unwrap();
    assert_eq!(owned.items.len(), 2);
    for p in &owned.items {
        assert_eq!(
            p.spec.as_ref().unwrap().node_name.as_deref(),
            Some("a"),
            "b's taint is not tolerated"
        );
        let t = p.status.as_ref().unwrap().container_statuses.as_ref().unwrap()[0]
            .state
            .as_ref()
            .unwrap()
            .terminated
            .clone()
            .unwrap();
        assert_eq!(t.message.as_deref(), Some("done"));
        assert_eq!(p.metadata.owner_references.as_ref().unwrap()[0].kind, "Job");
    }

    jobs.create(&PostParams::default(), &job("bad", "echo boom >&2; exit 3", 1, 1))
        .await
        .unwrap();
    let failed = wait_for("job bad to fail", 120, || async {
        let j = jobs.get("bad").await.ok()?;
        j.status
            .clone()?
            .conditions?
            .into_iter()
            .find(|c| c.type_ == "Failed" && c.status == "True")
    })
    .await;
    assert_eq!(failed.reason.as_deref(), Some("BackoffLimitExceeded"));
    assert_eq!(
        pods.list(&ListParams::default().labels("job-name=bad"))
            .await
            .unwrap()
            .items
            .len(),
        2,
        "one try plus one retry"
    );

    // Deleting a Job with background propagation removes its pods (ownerReference GC).
    jobs.delete("ok", &DeleteParams::background()).await.unwrap();
    wait_for("job ok's pods to be collected", 120, || async {
        pods.list(&ListParams::default().labels("job-name=ok"))
            .await
            .ok()?
            .items
            .is_empty()
            .then_some(())
    })
    .await;

    // Nothing fits: PodScheduled=False with the scheduler's reasons.
    let stuck: Pod = serde_json::from_value(
        json!({"metadata": {"name": "stuck"}, "spec": {"nodeSelector": {"pool": "y"},
        "containers": [{"name": "c", "image": "x", "command": ["true"]}]}}),
    )
    .unwrap();
    pods.create(&PostParams::default(), &stuck).await.unwrap();
    let message = wait_for("stuck to be unschedulable", 60, || async {
        let p = pods.get("stuck").await.ok()?;
        p.status?
            .conditions?
            .into_iter()
            .find(|c| c.type_ == "PodScheduled" && c.status == "False")?
            .message
    })
    .await;
    assert_eq!(message, "0/2 nodes are available: 1 node(s) didn't match Pod's node affinity/selector, 1 node(s) had untolerated taint(s).");
    cluster.shutdown().await;
}
