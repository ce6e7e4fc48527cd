//! Soak in the simulator: 4 nodes, 20 wrappers, a source that fails every
//! other request, 10 % API errors with cut watches, and agents SIGKILLed and
//! restarted at random, for a bounded time. At the end every wrapper is
//! Ready on every node, the pod that mounted a generation throughout never
//! lost it, and deleting the wrappers returns the memory. Prints the counts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use support::*;
use zerocopy_api::ModelWrapper;
use zerocopy_e2e::apiserver::{FaultConfig, FaultKind};
use zerocopy_e2e::NodeSpec;
use zerocopy_integration_tests::http::{Fault, Server};
use zerocopy_integration_tests::safetensors::{file, T};
use zerocopy_integration_tests::sha256_hex;

const NODES: usize = 4;
const WRAPPERS: usize = 20;
const CHAOS: Duration = Duration::from_secs(40);

async fn all_ready(api: &Api<ModelWrapper>) -> Option<()> {
    let list = api.list(&Default::default()).await.ok()?;
    let ready = list
        .items
        .iter()
        .filter(|w| {
            w.status.as_ref().is_some_and(|s| {
                s.phase.as_deref() == Some("Ready")
                    && s.ready_nodes == NODES as u32
                    && s.desired_nodes == NODES as u32
                    && s.observed_generation == w.metadata.generation
            })
        })
        .count();
    (ready == WRAPPERS).then_some(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_wrappers_survive_agent_kills_api_errors_and_a_flaky_source() {
    let nodes: Vec<NodeSpec> = (1..=NODES).map(|i| NodeSpec::new(&format!("node-{i}"))).collect();
    let mut env = Env::start_with(
        nodes,
        1,
        &[],
        &[
            "--allow-network",
            "127.0.0.0/8",
            "--retry-base",
            "0.5",
            "--retry-max",
            "4",
        ],
    )
    .await;
    let source = Server::start(Fault::EveryOther);
    let wrappers: Api<ModelWrapper> = Api::namespaced(env.client.clone(), NS);
    for i in 0..WRAPPERS {
        let body = file(&[T::f32("w", 16 * 1024, i as u32)]);
        let url = source.put(&format!("m{i}.safetensors"), body.clone());
        let w: ModelWrapper = serde_json::from_value(json!({
            "apiVersion": "zerocopy.dev/v1alpha1", "kind": "ModelWrapper",
            "metadata": {"name": format!("w{i}"), "namespace": NS},
            "spec": {"pipeline": {"components": [{"name": "enc", "weights": {"uri": url, "sha256": sha256_hex(&body)}}]}}
        }))
        .unwrap();
        wrappers.create(&PostParams::default(), &w).await.unwrap();
    }
    env.wait_alive("20 wrappers Ready on 4 nodes before the chaos", 300, || {
        all_ready(&wrappers)
    })
    .await;

    // A pod that reads its mount all along: it exits non-zero the moment the
    // mount is gone, so "Running at the end" means it never dropped.
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), NS);
    let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "watcher"}, "spec": {"restartPolicy": "Never",
        "nodeName": "node-1",
        "containers": [{"name": "c", "image": "x",
            "command": ["sh", "-c", "while test -f /m/manifest.json && test -f /m/enc.safetensors; do sleep 0.2; done; exit 3"],
            "volumeMounts": [{"name": "m", "mountPath": "/m", "readOnly": true}]}],
        "volumes": [{"name": "m", "csi": {"driver": "csi.zerocopy.dev", "readOnly": true, "volumeAttributes": {"modelWrapper": "w0"}}}]}}))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let running =
        || async { (pods.get("watcher").await.ok()?.status?.phase.as_deref() == Some("Running")).then_some(()) };
    env.wait_alive("the watcher pod running", 180, running).await;

    // Chaos: API errors and cut watches, agents killed at random.
    // API faults as a real server's: 429 with Retry-After, 500, 504 timeouts.
    env.cluster.api.faults.set(FaultConfig {
        error_rate: 0.1,
        kinds: FaultKind::ALL.to_vec(),
        cut_watches_within: Some(Duration::from_secs(3)),
        ..Default::default()
    });
    let requests_before = source.requests.load(std::sync::atomic::Ordering::SeqCst);
    // Half the wrappers roll to new weights under the chaos, so fills run
    // while agents die and the source fails.
    for i in WRAPPERS / 2..WRAPPERS {
        let body = file(&[T::f32("w", 16 * 1024, 1000 + i as u32)]);
        let url = source.put(&format!("m{i}-v2.safetensors"), body.clone());
        let patch = json!({"spec": {"pipeline": {"components": [{"name": "enc", "weights": {"uri": url, "sha256": sha256_hex(&body)}}]}}});
        // The test's own client sees the injected errors too: retry like any client.
        wait_for("the update accepted", 60, || async {
            wrappers
                .patch(&format!("w{i}"), &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .ok()
        })
        .await;
    }
    let started = Instant::now();
    let mut kills = 0u32;
    let mut seed = 0x2545_f491_u64;
    while started.elapsed() < CHAOS {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let node = format!("node-{}", 1 + seed % NODES as u64);
        env.cluster.restart_agent(&node).await.unwrap();
        kills += 1;
        env.assert_operators_alive();
        tokio::time::sleep(Duration::from_millis(1500 + seed % 2000)).await;
    }
    let injected = env.cluster.api.faults.injected();
    let by_kind: Vec<String> = FaultKind::ALL
        .iter()
        .map(|k| format!("{k:?} {}", env.cluster.api.faults.injected_of(*k)))
        .collect();
    env.cluster.api.faults.set(FaultConfig::default());

    env.wait_alive("every wrapper Ready on every node after the chaos", 300, || {
        all_ready(&wrappers)
    })
    .await;
    let watcher = pods.get("watcher").await.unwrap();
    assert_eq!(
        watcher.status.and_then(|s| s.phase).as_deref(),
        Some("Running"),
        "the pod's mount never dropped"
    );
    let source_requests = source.requests.load(std::sync::atomic::Ordering::SeqCst);

    // Memory returned: everything deleted, every node root empty.
    pods.delete("watcher", &DeleteParams::default()).await.unwrap();
    for i in 0..WRAPPERS {
        let _ = wrappers.delete(&format!("w{i}"), &DeleteParams::default()).await;
    }
    wait_for("every generation freed on every node", 300, || async {
        (1..=NODES)
            .all(|i| generations_on(&env.cluster, &format!("node-{i}")).is_empty())
            .then_some(())
    })
    .await;
    println!(
        "soak: {WRAPPERS} wrappers x {NODES} nodes, {}s of chaos: {kills} agent SIGKILLs, {injected} API errors injected ({}), \
         {} source requests (about half answered 503) for the {} wrappers rolled during the chaos, every wrapper Ready again, no mount dropped, memory returned",
        CHAOS.as_secs(),
        by_kind.join(", "),
        source_requests - requests_before,
        WRAPPERS / 2
    );
    env.stop().await;
}
