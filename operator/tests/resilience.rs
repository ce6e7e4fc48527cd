//! Resilience: restarts mid-rollout, two replicas with one leader, and a
//! faulty API server (10% errors, cut watches).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::ResourceExt;
use serde_json::json;
use support::*;
use zerocopy_api::{ModelReplica, ModelWrapper};
use zerocopy_e2e::apiserver::{FaultConfig, FaultKind};
use zerocopy_e2e::NodeSpec;

fn nodes(n: usize) -> Vec<NodeSpec> {
    (1..=n).map(|i| NodeSpec::new(&format!("node-{i}"))).collect()
}

async fn ready(api: &Api<ModelWrapper>, name: &str, nodes: u32, digest_not: Option<&str>) -> Option<String> {
    let s = api.get(name).await.ok()?.status?;
    let fresh = digest_not.is_none_or(|d| s.digest.as_deref() != Some(d));
    (s.phase.as_deref() == Some("Ready") && s.ready_nodes == nodes && s.desired_nodes == nodes && fresh)
        .then(|| s.digest.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_mid_rollout_converges_without_duplicates() {
    let mut env = Env::start(nodes(3), 1).await;
    let wrappers = env.create_wrapper("w", 256 * 1024, 1).await;
    let replicas: Api<ModelReplica> = Api::namespaced(env.client.clone(), NS);
    // Kill the operator as soon as it has started placing.
    wait_for("a first replica", 120, || async {
        (!replicas.list(&ListParams::default()).await.ok()?.items.is_empty()).then_some(())
    })
    .await;
    env.kill_operator(0);
    env.start_operator("op-restarted");
    let gen1 = wait_for("Ready 3/3 after the restart", 180, || ready(&wrappers, "w", 3, None)).await;

    // Again during a spec change.
    let (src2, sha2, _) = model(&env.cluster.dir, "m2.safetensors", 256 * 1024, 2);
    wrappers
        .patch(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"pipeline": {"components": [
            {"name": "enc", "weights": {"uri": format!("file://{}", src2.display()), "sha256": sha2}}]}}})),
        )
        .await
        .unwrap();
    // Kill it once it has started rolling the new generation out.
    wait_for("a replica of the new generation", 120, || async {
        replicas
            .list(&ListParams::default())
            .await
            .ok()?
            .items
            .iter()
            .any(|r| r.spec.generation != gen1)
            .then_some(())
    })
    .await;
    env.kill_operator(0);
    env.start_operator("op-restarted-again");
    wait_for("the new generation Ready 3/3", 180, || {
        ready(&wrappers, "w", 3, Some(&gen1))
    })
    .await;
    let list = replicas.list(&ListParams::default()).await.unwrap().items;
    let mut names: Vec<String> = list.iter().map(|r| r.spec.node.clone()).collect();
    names.sort();
    assert_eq!(
        names,
        vec!["node-1", "node-2", "node-3"],
        "one replica per node, no duplicates"
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_writes_and_a_standby_takes_over() {
    let mut env = Env::start(nodes(2), 2).await;
    let wrappers = env.create_wrapper("w", 4096, 1).await;
    let gen1 = wait_for("Ready 2/2", 180, || ready(&wrappers, "w", 2, None)).await;
    let leaders: Vec<usize> = (0..2)
        .filter(|i| env.operator_log(&format!("op-{i}")).contains("became leader"))
        .collect();
    assert_eq!(leaders.len(), 1, "exactly one leader");
    let standby = 1 - leaders[0];
    let standby_log = env.operator_log(&format!("op-{standby}"));
    assert!(
        !standby_log.contains("phase changed"),
        "the standby made no writes:\n{standby_log}"
    );

    // The leader dies; after its lease expires the standby leads and reconciles.
    env.kill_operator(leaders[0]);
    let (src2, sha2, _) = model(&env.cluster.dir, "m2.safetensors", 4096, 2);
    wrappers
        .patch(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"pipeline": {"components": [
            {"name": "enc", "weights": {"uri": format!("file://{}", src2.display()), "sha256": sha2}}]}}})),
        )
        .await
        .unwrap();
    wait_for("the standby to take over and roll the change", 180, || {
        ready(&wrappers, "w", 2, Some(&gen1))
    })
    .await;
    assert!(env.operator_log(&format!("op-{standby}")).contains("became leader"));
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn converges_with_injected_errors_and_cut_watches() {
    let mut env = Env::start(nodes(3), 1).await;
    // The mix a loaded or failing real server answers with: 429 with
    // Retry-After, 500, and 504 timeouts (some after the write was done).
    env.cluster.api.faults.set(FaultConfig {
        error_rate: 0.1,
        kinds: FaultKind::ALL.to_vec(),
        cut_watches_within: Some(Duration::from_secs(2)),
        ..Default::default()
    });
    let wrappers: Api<ModelWrapper> = Api::namespaced(env.client.clone(), NS);
    for (i, name) in ["a", "b"].iter().enumerate() {
        let (src, sha, _) = model(&env.cluster.dir, &format!("{name}.safetensors"), 4096, i as u32);
        let w: ModelWrapper = serde_json::from_value(wrapper(name, &src, &sha, json!({}), None)).unwrap();
        // The test's own client sees the faults too: retry like any client,
        // and a create whose answer timed out may have landed (409 next time).
        wait_for("create", 60, || async {
            match wrappers.create(&PostParams::default(), &w).await {
                Ok(_) => Some(()),
                Err(kube::Error::Api(e)) if e.code == 409 => Some(()),
                Err(_) => None,
            }
        })
        .await;
    }
    // Generous bounds (about 30 s alone): a loaded 2-core machine must not
    // fail this; a dead operator fails it at once instead.
    for name in ["a", "b"] {
        env.wait_alive("Ready 3/3 under faults", 300, || ready(&wrappers, name, 3, None))
            .await;
    }
    let nodes_api: Api<Node> = Api::all(env.client.clone());
    for name in ["a", "b"] {
        let label = format!("ready.zerocopy.dev/{NS}.{name}");
        env.wait_alive("labels under faults", 300, || async {
            (nodes_api
                .list(&ListParams::default().labels(&label))
                .await
                .ok()?
                .items
                .len()
                == 3)
                .then_some(())
        })
        .await;
    }
    // Faults are drawn at random, and a quick convergence may not have met
    // every kind yet: keep them on (Lease renewals and watches keep requests
    // flowing) until each kind has hit, then the wrappers must still be Ready.
    let faults = env.cluster.api.faults.clone();
    env.wait_alive("every kind of fault injected", 300, || {
        let all = FaultKind::ALL.iter().all(|k| faults.injected_of(*k) > 0);
        async move { all.then_some(()) }
    })
    .await;
    for name in ["a", "b"] {
        env.wait_alive("still Ready 3/3 after every kind of fault", 300, || {
            ready(&wrappers, name, 3, None)
        })
        .await;
    }
    env.cluster.api.faults.set(FaultConfig::default());
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_wrapper_does_not_stop_the_others() {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let env = Env::start(nodes(1), 1).await;
    // An object the current schema would refuse, as left behind by an older,
    // looser schema: loosen the CRD, write it, and let the operator meet it.
    let crds: Api<CustomResourceDefinition> = Api::all(env.client.clone());
    let mut crd = crds.get("modelwrappers.zerocopy.dev").await.unwrap();
    let schema = crd.spec.versions[0]
        .schema
        .as_mut()
        .unwrap()
        .open_api_v3_schema
        .as_mut()
        .unwrap();
    let spec = schema.properties.as_mut().unwrap().get_mut("spec").unwrap();
    *spec = serde_json::from_value(json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true})).unwrap();
    crds.replace("modelwrappers.zerocopy.dev", &PostParams::default(), &crd)
        .await
        .unwrap();
    let bad = env.cluster.dir.join("bad.yaml");
    std::fs::write(&bad, format!("apiVersion: zerocopy.dev/v1alpha1\nkind: ModelWrapper\nmetadata: {{name: bad, namespace: {NS}}}\nspec: {{pipeline: oops}}\n")).unwrap();
    kubectl(&env.cluster.kubeconfig, &["apply", "-f", bad.to_str().unwrap()]);

    let (src, sha, _) = model(&env.cluster.dir, "good.safetensors", 4096, 9);
    let wrappers: Api<ModelWrapper> = Api::namespaced(env.client.clone(), NS);
    wrappers
        .create(
            &PostParams::default(),
            &serde_json::from_value(wrapper("good", &src, &sha, json!({}), None)).unwrap(),
        )
        .await
        .unwrap();
    wait_for("the good wrapper Ready", 180, || ready(&wrappers, "good", 1, None)).await;
    let raw: Api<kube::api::DynamicObject> = Api::namespaced_with(
        env.client.clone(),
        NS,
        &kube::api::ApiResource::erase::<ModelWrapper>(&()),
    );
    let status = wait_for("the bad wrapper reported", 120, || async {
        let o = raw.get("bad").await.ok()?;
        let s = o.data.get("status")?.clone();
        (s["phase"] == "Failed").then_some(s)
    })
    .await;
    assert_eq!(status["conditions"][0]["reason"], "MalformedObject");
    assert!(
        status["conditions"][0]["message"]
            .as_str()
            .unwrap()
            .contains("invalid type"),
        "{status}"
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_restart_keeps_mounts_and_generations() {
    use k8s_openapi::api::core::v1::Pod;
    let env = Env::start(nodes(1), 1).await;
    let wrappers = env.create_wrapper("w", 64 * 1024, 5).await;
    let gen = wait_for("Ready 1/1", 180, || ready(&wrappers, "w", 1, None)).await;
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), NS);
    let pod = |name: &str| -> Pod {
        serde_json::from_value(json!({"metadata": {"name": name}, "spec": {"restartPolicy": "Never",
            "containers": [{"name": "c", "image": "x", "command": ["sh", "-c", "test -f /m/manifest.json && sleep 600"],
                "volumeMounts": [{"name": "m", "mountPath": "/m", "readOnly": true}]}],
            "volumes": [{"name": "m", "csi": {"driver": "csi.zerocopy.dev", "readOnly": true, "volumeAttributes": {"modelWrapper": "w"}}}]}}))
        .unwrap()
    };
    pods.create(&PostParams::default(), &pod("holder")).await.unwrap();
    let running = |name: &'static str| {
        let pods = pods.clone();
        async move { (pods.get(name).await.ok()?.status?.phase.as_deref() == Some("Running")).then_some(()) }
    };
    wait_for("holder running", 180, || running("holder")).await;
    let kubelet = env.cluster.node_dirs("node-1").unwrap().kubelet;
    let mounts = || {
        zerocopy_node_agent::mount::mounts()
            .unwrap()
            .into_iter()
            .filter(|m| m.mount_point.starts_with(&kubelet))
            .count()
    };
    assert_eq!(mounts(), 1);

    // SIGKILL and restart: the pod's mount and the generation stay; Ready again; new pods still mount.
    env.cluster.restart_agent("node-1").await.unwrap();
    // A new pod mounting proves the restarted agent is serving (it has read
    // its ledger and the root); only then is "the old mount is still there"
    // a statement about the restart and not about a slow start.
    pods.create(&PostParams::default(), &pod("after")).await.unwrap();
    wait_for("a new pod mounts after the restart", 180, || running("after")).await;
    assert_eq!(
        mounts(),
        2,
        "the running pod's mount survived the restart, beside the new pod's"
    );
    assert_eq!(generations_on(&env.cluster, "node-1"), vec![format!("w/{gen}")]);
    assert_eq!(
        pods.get("holder").await.unwrap().status.unwrap().phase.as_deref(),
        Some("Running")
    );
    wait_for("still Ready 1/1", 120, || ready(&wrappers, "w", 1, None)).await;
    env.stop().await;
}

fn degraded_message(w: &ModelWrapper) -> String {
    w.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Degraded"))
        .map(|c| c.message.clone())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_outages_and_cordons_keep_the_node_copy() {
    let mut env = Env::start_with(nodes(2), 1, &["--node-grace-seconds", "6"], &[]).await;
    let wrappers = env.create_wrapper("w", 64 * 1024, 1).await;
    let replicas: Api<ModelReplica> = Api::namespaced(env.client.clone(), NS);
    env.wait_alive("Ready 2/2", 300, || ready(&wrappers, "w", 2, None))
        .await;
    let nodes_api: Api<Node> = Api::all(env.client.clone());
    let label = format!("ready.zerocopy.dev/{NS}.w");
    let labelled = || async {
        nodes_api
            .list(&ListParams::default().labels(&label))
            .await
            .map(|l| l.items.len())
            .unwrap_or(0)
    };

    // A cordon never wipes a node: the operator sees it and keeps the replica.
    nodes_api
        .patch(
            "node-1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"unschedulable": true}})),
        )
        .await
        .unwrap();
    env.wait_alive("the cordon reported", 180, || async {
        degraded_message(&wrappers.get("w").await.ok()?)
            .contains("node-1 keeps its copy: node is cordoned")
            .then_some(())
    })
    .await;
    assert_eq!(replicas.list(&ListParams::default()).await.unwrap().items.len(), 2);
    assert_eq!(labelled().await, 2, "the ready label stays while the copy is intact");

    // A NotReady blip shorter than the grace period keeps the replica too ...
    env.cluster.set_node_ready("node-2", false).unwrap();
    env.wait_alive("the outage reported", 180, || async {
        degraded_message(&wrappers.get("w").await.ok()?)
            .contains("node-2 keeps its copy: node is not Ready")
            .then_some(())
    })
    .await;
    assert_eq!(replicas.list(&ListParams::default()).await.unwrap().items.len(), 2);
    // Its label goes meanwhile (no new pod should wait on it); node-1's stays.
    env.wait_alive("the down node's label removed", 60, || async {
        (labelled().await == 1).then_some(())
    })
    .await;
    // ... and a longer outage moves it.
    env.wait_alive("node-2's replica removed after the grace period", 300, || async {
        let items = replicas.list(&ListParams::default()).await.ok()?.items;
        (items.len() == 1 && items[0].spec.node == "node-1").then_some(())
    })
    .await;
    env.stop().await;
}

/// Item 8b: node-1's agent is too small for the model. Its fills fail with
/// `InsufficientCapacity`; after a few attempts the operator leaves node-1
/// and the wrapper is Ready on node-2 alone, remembered so that it does not
/// come back. A wrapper that may only go to node-1 stays there and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrapper_leaves_a_node_too_small_for_it() {
    let nodes = vec![NodeSpec::new("node-1").capacity("64Ki"), NodeSpec::new("node-2")];
    // Quick agent retries, so that the failures add up in seconds.
    let mut env = Env::start_with(nodes, 1, &[], &["--retry-base", "0.2", "--retry-max", "1"]).await;
    let wrappers = env.create_wrapper("w", 256 * 1024, 1).await; // 1 MiB
    let (src, sha, _) = model(&env.cluster.dir, "pinned.safetensors", 256 * 1024, 2);
    let pinned: ModelWrapper = serde_json::from_value(wrapper(
        "pinned",
        &src,
        &sha,
        json!({"kubernetes.io/hostname": "node-1"}),
        None,
    ))
    .unwrap();
    wrappers.create(&PostParams::default(), &pinned).await.unwrap();
    let replicas: Api<ModelReplica> = Api::namespaced(env.client.clone(), NS);

    env.wait_alive("w Ready on node-2 alone, its node-1 replica gone", 180, || async {
        ready(&wrappers, "w", 1, None).await?;
        let on: Vec<String> = replicas
            .list(&ListParams::default().labels("zerocopy.dev/wrapper=w"))
            .await
            .ok()?
            .items
            .iter()
            .map(|r| r.spec.node.clone())
            .collect();
        (on == ["node-2"]).then_some(())
    })
    .await;
    let w = wrappers.get("w").await.unwrap();
    let memory = w.annotations().get("zerocopy.dev/capacity-failed-nodes").cloned();
    assert!(
        memory.as_deref().is_some_and(|m| m.contains("node-1")),
        "node-1 remembered: {memory:?}"
    );
    let degraded = w
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Degraded").cloned())
        .unwrap();
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("False", "MovedForCapacity")
    );
    assert!(degraded.message.contains("node-1"), "{}", degraded.message);

    // Nowhere else to go: pinned stays on node-1, retrying, Degraded with the agent's numbers.
    let message = env
        .wait_alive("pinned Degraded for capacity on node-1", 180, || async {
            let s = wrappers.get("pinned").await.ok()?.status?;
            let d = s.conditions.iter().find(|c| c.type_ == "Degraded")?;
            (s.desired_nodes == 1 && d.status == "True" && d.reason == "InsufficientCapacity")
                .then(|| d.message.clone())
        })
        .await;
    assert!(message.starts_with("node-1: "), "{message}");
    assert!(message.contains("64.0 KiB"), "the agent's numbers: {message}");
    let on: Vec<String> = replicas
        .list(&ListParams::default().labels("zerocopy.dev/wrapper=pinned"))
        .await
        .unwrap()
        .items
        .iter()
        .map(|r| r.spec.node.clone())
        .collect();
    assert_eq!(on, ["node-1"]);
    // And w did not come back to node-1 meanwhile.
    assert_eq!(
        replicas
            .list(&ListParams::default().labels("zerocopy.dev/wrapper=w"))
            .await
            .unwrap()
            .items
            .len(),
        1
    );
    env.stop().await;
}
