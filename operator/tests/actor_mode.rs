//! Actor mode end to end in the cluster simulator: the real operator binary,
//! real node agents in cluster mode filling real tmpfs, pods mounting the
//! volume through the agents' CSI sockets and loading it with `modelwrapper`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::ResourceExt;
use serde_json::json;
use support::*;
use zerocopy_api::{ModelReplica, ModelWrapper};
use zerocopy_e2e::NodeSpec;

async fn status_of(api: &Api<ModelWrapper>, name: &str) -> Option<zerocopy_api::ModelWrapperStatus> {
    api.get(name).await.ok()?.status
}

fn loader_pod(name: &str, label: &str, command: &[&str]) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "restartPolicy": "Never",
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": label, "operator": "Exists"}]}]}}},
            "containers": [{"name": "main", "image": "ray", "command": command,
                "env": [{"name": "MODELWRAPPER_PATH", "value": "/models/bert"}],
                "volumeMounts": [{"name": "bert", "mountPath": "/models/bert", "readOnly": true}]}],
            "volumes": [{"name": "bert", "csi": {"driver": "csi.zerocopy.dev", "readOnly": true, "volumeAttributes": {"modelWrapper": "bert"}}}]
        }
    }))
    .unwrap()
}

const LOAD_AND_HASH: &str = "import hashlib, os, modelwrapper\n\
p = modelwrapper.load(os.environ['MODELWRAPPER_PATH'])\n\
h = hashlib.sha256(b''.join(p[k].numpy().tobytes() for k in sorted(p))).hexdigest()\n\
print(h)\n\
open('/dev/termination-log', 'w').write(h)\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn place_fill_label_load_roll_remove_and_delete() {
    let nodes = vec![
        NodeSpec::new("node-1").label("pool", "gpu"),
        NodeSpec::new("node-2").label("pool", "gpu"),
        NodeSpec::new("node-3").label("pool", "gpu"),
        NodeSpec::new("node-4").label("pool", "cpu"),
    ];
    let env = Env::start(nodes, 1).await;
    let (src, sha, tensor_sha) = model(&env.cluster.dir, "bert-v1.safetensors", 64 * 1024, 1);
    let wrappers: Api<ModelWrapper> = Api::namespaced(env.client.clone(), NS);
    wrappers
        .create(
            &PostParams::default(),
            &serde_json::from_value(wrapper("bert", &src, &sha, json!({"pool": "gpu"}), None)).unwrap(),
        )
        .await
        .unwrap();

    // 3 of 4 nodes: three replicas, three real fills, Ready 3/3.
    let status = wait_for("bert Ready 3/3", 180, || async {
        let s = status_of(&wrappers, "bert").await?;
        (s.phase.as_deref() == Some("Ready") && s.ready_nodes == 3).then_some(s)
    })
    .await;
    assert_eq!(status.desired_nodes, 3);
    assert_eq!(status.total_bytes, std::fs::metadata(&src).unwrap().len());
    let label = status.ready_label.clone().unwrap();
    assert_eq!(label, "ready.zerocopy.dev/ml.bert");
    let replicas: Api<ModelReplica> = Api::namespaced(env.client.clone(), NS);
    let mut on: Vec<String> = replicas
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|r| r.spec.node.clone())
        .collect();
    on.sort();
    assert_eq!(on, vec!["node-1", "node-2", "node-3"]);
    let nodes_api: Api<Node> = Api::all(env.client.clone());
    let labelled = wait_for("ready labels", 60, || async {
        let l = nodes_api.list(&ListParams::default().labels(&label)).await.ok()?;
        let mut names: Vec<String> = l.items.iter().map(|n| n.name_any()).collect();
        names.sort();
        (names.len() == 3).then_some(names)
    })
    .await;
    assert_eq!(labelled, vec!["node-1", "node-2", "node-3"]);
    // The ready label is the operator's, by its field manager, in managedFields.
    let node = nodes_api.get("node-1").await.unwrap();
    let owners: Vec<String> = node
        .metadata
        .managed_fields
        .unwrap_or_default()
        .iter()
        .filter(|m| {
            m.fields_v1
                .as_ref()
                .is_some_and(|f| f.0["f:metadata"]["f:labels"].get(format!("f:{label}")).is_some())
        })
        .filter_map(|m| m.manager.clone())
        .collect();
    assert_eq!(owners, vec![zerocopy_api::labels::OPERATOR_MANAGER.to_string()]);
    let gen1 = status.digest.clone().unwrap();
    for n in ["node-1", "node-2", "node-3"] {
        assert_eq!(
            generations_on(&env.cluster, n),
            vec![format!("bert/{gen1}")],
            "{n} holds the generation"
        );
    }
    assert!(generations_on(&env.cluster, "node-4").is_empty());

    // Phase transitions are recorded as Events on the wrapper.
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(env.client.clone(), NS);
    let reasons = wait_for("a Ready event", 60, || async {
        let l = events
            .list(&ListParams::default().fields("regarding.name=bert"))
            .await
            .ok()?;
        let reasons: Vec<String> = l.items.iter().filter_map(|e| e.reason.clone()).collect();
        reasons.contains(&"Ready".to_string()).then_some(reasons)
    })
    .await;
    assert!(reasons.contains(&"Filling".to_string()), "{reasons:?}");
    // The same Events through core/v1, which `kubectl describe` reads.
    let described = kubectl(&env.cluster.kubeconfig, &["describe", "mw", "bert", "-n", NS]);
    assert!(described.contains("Filling -> Ready"), "{described}");

    // kubectl shows the printer columns.
    let out = kubectl(&env.cluster.kubeconfig, &["get", "mw", "-n", NS]);
    let header: Vec<&str> = out.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        vec!["NAME", "MODE", "PHASE", "READY", "DESIRED", "SIZE", "AGE"],
        "{out}"
    );
    let row: Vec<&str> = out.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(row[..5], ["bert", "actor", "Ready", "3", "3"], "{out}");

    // A pod scheduled by the ready label loads the pipeline: same bytes as the source.
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), NS);
    pods.create(
        &PostParams::default(),
        &loader_pod("loader", &label, &["python3", "-c", LOAD_AND_HASH]),
    )
    .await
    .unwrap();
    let pod = wait_for("loader to finish", 300, || async {
        let p = pods.get("loader").await.ok()?;
        matches!(p.status.as_ref()?.phase.as_deref(), Some("Succeeded" | "Failed")).then_some(p)
    })
    .await;
    let log = env.cluster.pod_log(NS, "loader", "main").unwrap_or_default();
    assert_eq!(
        pod.status.as_ref().unwrap().phase.as_deref(),
        Some("Succeeded"),
        "{log}"
    );
    assert!(["node-1", "node-2", "node-3"].contains(&pod.spec.as_ref().unwrap().node_name.as_deref().unwrap()));
    assert_eq!(log.trim(), tensor_sha, "the pod read the source model's bytes");

    // A running pod keeps the old generation while the spec rolls a new one.
    pods.create(&PostParams::default(), &loader_pod("holder", &label, &["sleep", "600"]))
        .await
        .unwrap();
    let holder_node = wait_for("holder to run", 180, || async {
        let p = pods.get("holder").await.ok()?;
        (p.status.as_ref()?.phase.as_deref() == Some("Running")).then(|| p.spec.unwrap().node_name.unwrap())
    })
    .await;
    let (src2, sha2, _) = model(&env.cluster.dir, "bert-v2.safetensors", 64 * 1024, 2);
    let patch = json!({"spec": {"pipeline": {"components": [{"name": "enc", "weights": {"uri": format!("file://{}", src2.display()), "sha256": sha2}}]}}});
    wrappers
        .patch("bert", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let status2 = wait_for("generation 2 Ready 3/3", 180, || async {
        let s = status_of(&wrappers, "bert").await?;
        (s.digest.as_deref() != Some(gen1.as_str()) && s.phase.as_deref() == Some("Ready") && s.ready_nodes == 3)
            .then_some(s)
    })
    .await;
    let gen2 = status2.digest.unwrap();
    wait_for("old generation freed where no pod mounts it", 120, || async {
        ["node-1", "node-2", "node-3"]
            .iter()
            .all(|n| {
                let gens = generations_on(&env.cluster, n);
                if *n == holder_node {
                    gens == vec![format!("bert/{gen1}"), format!("bert/{gen2}")]
                        || gens == vec![format!("bert/{gen2}"), format!("bert/{gen1}")]
                } else {
                    gens == vec![format!("bert/{gen2}")]
                }
            })
            .then_some(())
    })
    .await;
    pods.delete("holder", &DeleteParams::default()).await.unwrap();
    wait_for("old generation freed after the pod ended", 120, || async {
        (generations_on(&env.cluster, &holder_node) == vec![format!("bert/{gen2}")]).then_some(())
    })
    .await;

    // A node removed: its replica goes; 2/2 of the new desired set.
    env.cluster.remove_node("node-3").await.unwrap();
    wait_for("2/2 after node-3 left", 120, || async {
        let s = status_of(&wrappers, "bert").await?;
        (s.desired_nodes == 2 && s.ready_nodes == 2 && s.phase.as_deref() == Some("Ready")).then_some(())
    })
    .await;
    wait_for("node-3's replica deleted", 60, || async {
        let l = replicas.list(&ListParams::default()).await.ok()?;
        (l.items.len() == 2 && l.items.iter().all(|r| r.spec.node != "node-3")).then_some(())
    })
    .await;

    // The wrapper deleted: replicas, labels and node memory go.
    wrappers.delete("bert", &DeleteParams::default()).await.unwrap();
    wait_for("wrapper gone", 120, || async {
        wrappers.get("bert").await.is_err().then_some(())
    })
    .await;
    wait_for("replicas gone", 120, || async {
        replicas
            .list(&ListParams::default())
            .await
            .ok()?
            .items
            .is_empty()
            .then_some(())
    })
    .await;
    wait_for("labels gone", 120, || async {
        nodes_api
            .list(&ListParams::default().labels(&label))
            .await
            .ok()?
            .items
            .is_empty()
            .then_some(())
    })
    .await;
    wait_for("node memory freed", 120, || async {
        ["node-1", "node-2"]
            .iter()
            .all(|n| generations_on(&env.cluster, n).is_empty())
            .then_some(())
    })
    .await;
    env.stop().await;
}
