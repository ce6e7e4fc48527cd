//! Namespace isolation in cluster mode: a pod in another namespace that
//! names a Ready wrapper of `ml` gets nothing, on the same node where `ml`'s
//! own pod mounts it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use k8s_openapi::api::core::v1::{Event, Namespace, Pod};
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;
use support::*;
use zerocopy_e2e::NodeSpec;

fn pod(name: &str) -> Pod {
    serde_json::from_value(json!({"metadata": {"name": name}, "spec": {"restartPolicy": "Never", "nodeName": "node-1",
        "containers": [{"name": "c", "image": "x", "command": ["sh", "-c", "cat /m/manifest.json > /dev/null && sleep 600"],
            "volumeMounts": [{"name": "m", "mountPath": "/m", "readOnly": true}]}],
        "volumes": [{"name": "m", "csi": {"driver": "csi.zerocopy.dev", "readOnly": true, "volumeAttributes": {"modelWrapper": "w"}}}]}}))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_namespace_cannot_mount_a_wrapper_by_its_name() {
    let mut env = Env::start(vec![NodeSpec::new("node-1")], 1).await;
    let wrappers = env.create_wrapper("w", 16 * 1024, 3).await;
    env.wait_alive("w Ready in ml", 300, || async {
        let s = wrappers.get("w").await.ok()?.status?;
        (s.phase.as_deref() == Some("Ready")).then_some(())
    })
    .await;
    let nss: Api<Namespace> = Api::all(env.client.clone());
    nss.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "tenant-b"}})).unwrap(),
    )
    .await
    .unwrap();

    let own: Api<Pod> = Api::namespaced(env.client.clone(), NS);
    let other: Api<Pod> = Api::namespaced(env.client.clone(), "tenant-b");
    own.create(&PostParams::default(), &pod("reader")).await.unwrap();
    other.create(&PostParams::default(), &pod("intruder")).await.unwrap();

    env.wait_alive("ml's own pod running with the mount", 180, || async {
        (own.get("reader").await.ok()?.status?.phase.as_deref() == Some("Running")).then_some(())
    })
    .await;
    let events: Api<Event> = Api::namespaced(env.client.clone(), "tenant-b");
    let message = env
        .wait_alive("the intruder's mount refused", 180, || async {
            events
                .list(&ListParams::default())
                .await
                .ok()?
                .items
                .into_iter()
                .find(|e| e.reason.as_deref() == Some("FailedMount"))
                .and_then(|e| e.message)
        })
        .await;
    assert!(
        message.contains("tenant-b/w not found") && message.contains("pod's own namespace"),
        "{message}"
    );
    let phase = other.get("intruder").await.unwrap().status.and_then(|s| s.phase);
    assert_ne!(phase.as_deref(), Some("Running"), "the intruder never started");
    env.stop().await;
}
