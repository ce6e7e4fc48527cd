//! The seed's workflow across the simulated cluster: a driver pod calls
//! `ModelWrapper.from_model()`, worker pods on other nodes (some started
//! before it) call `wrapper.load()` from the namespace catalog volume; the
//! real operator places the wrapper where the catalog is mounted, the real
//! agents take the upload and copy it between themselves. Also: peer fill
//! keeps an http origin to about one download for four nodes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod};
use kube::api::{Api, DeleteParams, PostParams};
use kube::ResourceExt;
use serde_json::{json, Value};
use support::*;
use zerocopy_api::ModelWrapper;
use zerocopy_e2e::NodeSpec;
use zerocopy_integration_tests::http::{Fault, Server};
use zerocopy_integration_tests::safetensors::{file, T};
use zerocopy_integration_tests::{sha256_hex, TmpfsDir};

const PEER_TOKEN: &str = "simulated-cluster-peer-token";

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/catalog")
}

/// A pod on `node` that mounts its namespace's catalog at /mnt/models and
/// runs `pod.py <role>`.
fn catalog_pod(
    ns: &str,
    name: &str,
    node: &str,
    role: &str,
    shared: &Path,
    kubeconfig: &Path,
    owner: Option<&Value>,
) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "nodeName": node,
            "restartPolicy": "Never",
            "containers": [{
                "name": "main", "image": "rayproject/ray",
                "command": ["python3", data_dir().join("pod.py").display().to_string(), role],
                "env": [
                    {"name": "MODELWRAPPER_CATALOG", "value": "/mnt/models"},
                    {"name": "SHARED_DIR", "value": shared.display().to_string()},
                    {"name": "KUBECONFIG", "value": kubeconfig.display().to_string()},
                    {"name": "PYTHONPATH", "value": data_dir().display().to_string()},
                    {"name": "OWNER", "value": owner.map(|o| o.to_string()).unwrap_or_default()},
                    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}
                ],
                "volumeMounts": [{"name": "models", "mountPath": "/mnt/models", "readOnly": true}]
            }],
            "volumes": [{"name": "models", "csi": {"driver": "csi.zerocopy.dev", "readOnly": true, "volumeAttributes": {"catalog": "true"}}}]
        }
    }))
    .unwrap()
}

fn read_json(path: &Path) -> Option<Value> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Waits for `pod`'s result file; fails at once with the pod's log when the
/// pod's program died (a traceback), instead of waiting out the bound.
async fn result_of(env: &mut Env, ns: &str, pod: &str, path: &Path, secs: u64) -> Value {
    result_of_container(env, ns, pod, "main", path, secs).await
}

async fn result_of_container(env: &mut Env, ns: &str, pod: &str, container: &str, path: &Path, secs: u64) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        env.assert_operators_alive();
        if let Some(v) = read_json(path) {
            return v;
        }
        let log = env.cluster.pod_log(ns, pod, container).unwrap_or_default();
        let timed_out = std::time::Instant::now() > deadline;
        if log.contains("Traceback") || timed_out {
            let pods: Api<Pod> = Api::namespaced(env.client.clone(), ns);
            let status = pods.get_opt(pod).await.ok().flatten().and_then(|p| p.status);
            let agents: String = ["node-1", "node-2", "node-3", "node-4"]
                .iter()
                .filter_map(|n| env.cluster.node_dirs(n))
                .map(|d| std::fs::read_to_string(d.base.join("agent.log")).unwrap_or_default())
                .map(|l| l.lines().rev().take(15).collect::<Vec<_>>().join("\n"))
                .collect::<Vec<_>>()
                .join("\n---\n");
            panic!(
                "pod {ns}/{pod} {}:\n{log}\nstatus: {status:?}\nagents (last lines, newest first):\n{agents}\noperator:\n{}",
                if timed_out { "gave no result in time" } else { "failed" },
                env.operator_log("op-0").lines().rev().take(20).collect::<Vec<_>>().join("\n")
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Pss of every `.safetensors` mapping of `pid`, in bytes.
fn weights_pss(pid: u64) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut current = false;
    let mut total = 0;
    for line in smaps.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        if !parts[0].ends_with(':') {
            current = parts.last().is_some_and(|p| p.ends_with(".safetensors"));
        } else if current && parts[0] == "Pss:" {
            total += parts[1].parse::<u64>().unwrap() * 1024;
        }
    }
    total
}

/// `zerocopy_gc_kept_total` for `wrapper` from an agent's /metrics (0 when
/// absent or unreachable).
fn kept_total(metrics_addr: &str, wrapper: &str) -> u64 {
    use std::io::{Read, Write};
    let Ok(mut conn) = std::net::TcpStream::connect(metrics_addr) else {
        return 0;
    };
    let _ = conn.set_read_timeout(Some(std::time::Duration::from_secs(10)));
    let _ = write!(conn, "GET /metrics HTTP/1.0\r\nHost: {metrics_addr}\r\n\r\n");
    let mut text = String::new();
    let _ = conn.read_to_string(&mut text);
    text.lines()
        .filter(|l| l.starts_with("zerocopy_gc_kept_total{") && l.contains(&format!("wrapper=\"{wrapper}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn agent_log(env: &Env, node: &str) -> String {
    std::fs::read_to_string(env.cluster.node_dirs(node).unwrap().base.join("agent.log")).unwrap_or_default()
}

async fn start_env(tmp: &TmpfsDir, nodes: usize, extra_agent_args: &[&str]) -> Env {
    let token = tmp.path().join("peer-token");
    std::fs::write(&token, PEER_TOKEN).unwrap();
    let token_arg = format!("--peer-token-file={}", token.display());
    let mut agent_args = vec!["--peer-addr=127.0.0.1:0", token_arg.as_str()];
    agent_args.extend_from_slice(extra_agent_args);
    let nodes = (1..=nodes).map(|i| NodeSpec::new(&format!("node-{i}"))).collect();
    // Node roots on a tmpfs: generations are shared memory, as on a real node.
    Env::start_in(Some(tmp.path().join("cluster")), nodes, 1, &[], &agent_args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_model_in_a_driver_pod_and_load_in_pods_on_every_node() {
    let tmp = TmpfsDir::new();
    let mut env = start_env(&tmp, 3, &["--consumer-grace-seconds=2"]).await;
    let shared = tmp.path().join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    let kubeconfig = env.cluster.kubeconfig.clone();
    let nss: Api<Namespace> = Api::all(env.client.clone());
    nss.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "other"}})).unwrap(),
    )
    .await
    .unwrap();
    // The object whose lifetime the wrapper follows (a RayCluster in real use).
    let cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), NS);
    let owner_cm = cms
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "raycluster"}})).unwrap(),
        )
        .await
        .unwrap();
    let owner = json!({"apiVersion": "v1", "kind": "ConfigMap", "name": "raycluster", "uid": owner_cm.uid().unwrap()});
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), NS);
    let pp = PostParams::default();

    // Workers start before the model exists.
    for (name, node) in [("worker-2a", "node-2"), ("worker-2b", "node-2"), ("worker-3", "node-3")] {
        pods.create(&pp, &catalog_pod(NS, name, node, "worker", &shared, &kubeconfig, None))
            .await
            .unwrap();
    }
    pods.create(
        &pp,
        &catalog_pod(NS, "driver", "node-1", "driver", &shared, &kubeconfig, Some(&owner)),
    )
    .await
    .unwrap();
    let driver = result_of(&mut env, NS, "driver", &shared.join("driver.json"), 60).await;
    assert_eq!(
        driver["tasks_equal"], true,
        "for_tasks(pipeline)(x) == pipeline(x): {driver}"
    );
    assert!(
        driver["pickle_bytes"].as_u64().unwrap() < 2048,
        "a wrapper pickles to a reference: {driver}"
    );
    // The driver may go once from_model() returned: the other nodes still fill.
    pods.delete("driver", &DeleteParams::default()).await.unwrap();

    let mut results = Vec::new();
    for name in ["worker-2a", "worker-2b", "worker-3"] {
        let path = shared.join(format!("result-{name}.json"));
        let r = result_of(&mut env, NS, name, &path, 300).await;
        assert_eq!(r["equal"], true, "{name}: outputs differ from the driver's model: {r}");
        let mapped = r["mapped"].as_array().unwrap();
        assert!(!mapped.is_empty(), "{name} maps no weights: {r}");
        assert!(
            mapped.iter().all(|m| m.as_str().unwrap().starts_with("/mnt/models/")),
            "{name}: tensor data must lie in the catalog mount: {r}"
        );
        results.push(r);
    }

    // One copy per node: one generation of the wrapper on each node, no
    // upload left over, and two pods on node-2 share its pages.
    let wrappers: Api<ModelWrapper> = Api::namespaced(env.client.clone(), NS);
    let actor = wrappers
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .find(|w| w.labels().get("zerocopy.dev/created-by").map(String::as_str) == Some("from_model"))
        .expect("from_model made a wrapper");
    assert_eq!(actor.spec.placement, zerocopy_api::Placement::Consumers);
    let name = actor.name_any();
    for node in ["node-1", "node-2", "node-3"] {
        let gens: Vec<String> = generations_on(&env.cluster, node)
            .into_iter()
            .filter(|g| g.starts_with(&format!("{name}/")))
            .collect();
        assert_eq!(gens.len(), 1, "{node} holds {gens:?}");
        let uploads = env.cluster.node_dirs(node).unwrap().root.join(".uploads");
        let left = std::fs::read_dir(&uploads).map(|d| d.count()).unwrap_or(0);
        assert_eq!(left, 0, "{node}: uploads left in shared memory");
    }
    let bytes = actor.status.as_ref().unwrap().total_bytes;
    let pss: u64 = results[..2]
        .iter()
        .map(|r| weights_pss(r["pid"].as_u64().unwrap()))
        .sum();
    assert!(
        pss <= bytes + bytes / 10,
        "two pods on node-2 hold {pss} bytes of weights for a {bytes}-byte model: not one shared copy"
    );

    // Bytes came from the driver once: nodes 2 and 3 copied from peers.
    let uploaded: usize = ["node-1", "node-2", "node-3"]
        .iter()
        .map(|n| {
            std::fs::read_to_string(env.cluster.node_dirs(n).unwrap().base.join("agent.log"))
                .unwrap_or_default()
                .matches("upload verified")
                .count()
        })
        .sum();
    // Each distinct file (2 weights, the skeletons, the pipeline skeleton;
    // identical skeletons share a digest) once; for_tasks() reused the
    // wrapper from_model() made (same bytes), so nothing was uploaded twice.
    let pipeline = &actor.spec.pipeline;
    let distinct: std::collections::BTreeSet<&str> = pipeline
        .components
        .iter()
        .flat_map(|c| {
            [
                c.weights.as_ref().and_then(|w| w.sha256.as_deref()),
                c.skeleton.as_ref().and_then(|s| s.sha256.as_deref()),
            ]
        })
        .chain([pipeline.skeleton.as_ref().and_then(|s| s.sha256.as_deref())])
        .flatten()
        .collect();
    assert!(
        distinct.len() >= 4,
        "weights and skeletons are pinned by digest: {distinct:?}"
    );
    assert_eq!(uploaded, distinct.len(), "each distinct file uploaded once");

    // A node joining later gets its copy when a pod there mounts the catalog.
    env.cluster.add_node(NodeSpec::new("node-4")).await.unwrap();
    pods.create(
        &pp,
        &catalog_pod(NS, "worker-4", "node-4", "worker", &shared, &kubeconfig, None),
    )
    .await
    .unwrap();
    let r = result_of(&mut env, NS, "worker-4", &shared.join("result-worker-4.json"), 300).await;
    assert_eq!(r["equal"], true, "{r}");

    // Another namespace sees nothing of ml's.
    let other: Api<Pod> = Api::namespaced(env.client.clone(), "other");
    other
        .create(
            &pp,
            &catalog_pod("other", "snoop", "node-2", "list", &shared, &kubeconfig, None),
        )
        .await
        .unwrap();
    let listed = result_of(&mut env, "other", "snoop", &shared.join("list-snoop.json"), 120).await;
    assert_eq!(
        listed,
        json!([".node.json"]),
        "another namespace's catalog shows ml's wrappers"
    );

    // Deleting the owner collects the wrapper. A node keeps the generation
    // while a pod there still maps it (those pages are in use whatever the
    // agent does; kept, they stay counted and visible), and the node with no
    // pod left (node-1: the driver went) frees it.
    let mapped_by_pods = ["node-2", "node-3", "node-4"];
    let logged_before: Vec<usize> = mapped_by_pods.iter().map(|n| agent_log(&env, n).len()).collect();
    cms.delete("raycluster", &DeleteParams::default()).await.unwrap();
    env.wait_alive("the wrapper to be garbage-collected", 120, || async {
        wrappers.get_opt(&name).await.unwrap().is_none().then_some(())
    })
    .await;
    let holds = |node: &str| {
        generations_on(&env.cluster, node)
            .iter()
            .any(|g| g.starts_with(&format!("{name}/")))
    };
    wait_for(
        "nodes whose pods map the generation to keep it, and node-1 to free it",
        120,
        || async {
            let kept = mapped_by_pods.iter().zip(&logged_before).all(|(n, from)| {
                agent_log(&env, n)
                    .get(*from..)
                    .unwrap_or_default()
                    .lines()
                    .any(|l| l.contains("kept generation") && l.contains(&name))
            });
            (kept && !holds("node-1")).then_some(())
        },
    )
    .await;
    // Still kept after every agent looked again (two more collection passes
    // counted on its metrics), not only the first time.
    let kept_passes = |node: &str| kept_total(&env.cluster.node_dirs(node).unwrap().metrics_addr, &name);
    let passes_before: Vec<u64> = mapped_by_pods.iter().map(|n| kept_passes(n)).collect();
    wait_for("every agent to look at the generation again", 120, || async {
        mapped_by_pods
            .iter()
            .zip(&passes_before)
            .all(|(n, before)| kept_passes(n) >= before + 2)
            .then_some(())
    })
    .await;
    for node in mapped_by_pods {
        assert!(holds(node), "{node} freed the generation its worker pod still maps");
    }

    // Once those pods are gone, every node frees it: nothing else happens on
    // the nodes, no wanted set changes.
    for pod in ["worker-2a", "worker-2b", "worker-3", "worker-4"] {
        pods.delete(pod, &DeleteParams::default()).await.unwrap();
    }
    wait_for("every node to free the generation", 120, || async {
        ["node-1", "node-2", "node-3", "node-4"]
            .iter()
            .all(|n| !holds(n))
            .then_some(())
    })
    .await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_nodes_fill_from_about_one_origin_download() {
    let tmp = TmpfsDir::new();
    let mut env = start_env(&tmp, 4, &["--allow-network=127.0.0.0/8"]).await;
    let server = Server::start(Fault::None);
    let body = file(&[T::f32("w", 2_000_000, 5)]); // 8 MB
    let url = server.put("big.safetensors", body.clone());
    let wrappers: Api<ModelWrapper> = Api::namespaced(env.client.clone(), NS);
    // The test server is on 127.0.0.1: allowed explicitly, as an admin would
    // allow an in-cluster object store.
    let w: ModelWrapper = serde_json::from_value(json!({
        "apiVersion": "zerocopy.dev/v1alpha1", "kind": "ModelWrapper",
        "metadata": {"name": "big", "namespace": NS},
        "spec": {"pipeline": {"components": [{"name": "enc", "weights": {"uri": url, "sha256": sha256_hex(&body)}}]}}
    }))
    .unwrap();
    wrappers.create(&PostParams::default(), &w).await.unwrap();
    env.wait_alive("big Ready on 4 nodes", 300, || async {
        let s = wrappers.get("big").await.ok()?.status?;
        (s.ready_nodes == 4).then_some(())
    })
    .await;
    let served = server.bytes_served.load(std::sync::atomic::Ordering::SeqCst);
    let size = body.len() as u64;
    println!("origin served {served} bytes for a {size}-byte model on 4 nodes");
    assert!(
        served * 10 <= size * 12,
        "the origin served {served} bytes for a {size}-byte model on 4 nodes (more than 1.2x)"
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_component_fills_on_every_node_pinned_and_copied_between_agents() {
    let tmp = TmpfsDir::new();
    // A sharded model directory on the nodes' disk, below a directory the
    // admin allowed; in a cluster every file is pinned.
    let models = tmp.path().join("models");
    let dir = models.join("llm");
    std::fs::create_dir_all(dir.join("1_Pooling")).unwrap();
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("model-00001-of-00002.safetensors", file(&[T::f32("a.weight", 300_000, 7)])),
        ("model-00002-of-00002.safetensors", file(&[T::f32("b.weight", 200_000, 8)])),
        (
            "model.safetensors.index.json",
            br#"{"weight_map": {"a.weight": "model-00001-of-00002.safetensors", "b.weight": "model-00002-of-00002.safetensors"}}"#.to_vec(),
        ),
        ("config.json", br#"{"model_type": "test"}"#.to_vec()),
        ("1_Pooling/config.json", br#"{"pooling_mode_mean_tokens": true}"#.to_vec()),
    ];
    let mut pins = serde_json::Map::new();
    for (rel, bytes) in &files {
        std::fs::write(dir.join(rel), bytes).unwrap();
        pins.insert(rel.to_string(), json!(sha256_hex(bytes)));
    }
    let allow = format!("--allow-file-dir={}", models.display());
    let mut env = start_env(&tmp, 2, &[allow.as_str()]).await;
    // Both agents live before the wrapper exists, so one placement holds both
    // nodes. (Two nodes placed by separate reconciles while the first still
    // fills may both read the origin: the second only waits for nodes
    // ordered before it; docs/csi.md "Uploads and peer copies".)
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(env.client.clone(), support::SYSTEM_NS);
    env.wait_alive("both agents' Leases", 120, || async {
        let names: Vec<String> = leases
            .list(&Default::default())
            .await
            .ok()?
            .items
            .into_iter()
            .filter_map(|l| l.metadata.name)
            .collect();
        (names.iter().any(|n| n == "node-1") && names.iter().any(|n| n == "node-2")).then_some(())
    })
    .await;
    let wrappers: Api<ModelWrapper> = Api::namespaced(env.client.clone(), NS);
    let w: ModelWrapper = serde_json::from_value(json!({
        "apiVersion": "zerocopy.dev/v1alpha1", "kind": "ModelWrapper",
        "metadata": {"name": "llm", "namespace": NS},
        "spec": {"pipeline": {"components": [{"name": "llm", "source": {"uri": format!("file://{}/", dir.display()), "sha256": pins}}]}}
    }))
    .unwrap();
    wrappers.create(&PostParams::default(), &w).await.unwrap();
    let digest = env
        .wait_alive("llm Ready on 2 nodes", 300, || async {
            let s = wrappers.get("llm").await.ok()?.status?;
            (s.ready_nodes == 2).then_some(s.digest?)
        })
        .await;
    for node in ["node-1", "node-2"] {
        let root = env.cluster.node_dirs(node).unwrap().root;
        let gen = root.join(NS).join("llm").join(&digest);
        let manifest: Value = serde_json::from_slice(&std::fs::read(gen.join("manifest.json")).unwrap()).unwrap();
        assert_eq!(manifest["format"], "zerocopy.dev/v2", "{node}");
        assert_eq!(
            manifest["components"][0]["directory"]["weights"],
            json!([
                "llm/model-00001-of-00002.safetensors",
                "llm/model-00002-of-00002.safetensors"
            ]),
            "{node}"
        );
        for (rel, bytes) in &files {
            assert_eq!(
                &std::fs::read(gen.join("llm").join(rel)).unwrap(),
                bytes,
                "{node}: {rel}"
            );
        }
    }
    // One node read the node's disk, the other copied every file from it.
    let copied: usize = ["node-1", "node-2"]
        .iter()
        .map(|n| agent_log(&env, n).matches("copied from a peer").count())
        .sum();
    assert_eq!(
        copied,
        files.len(),
        "every file of the second node came from the first\nnode-1:\n{}\nnode-2:\n{}",
        agent_log(&env, "node-1"),
        agent_log(&env, "node-2")
    );
    env.stop().await;
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A pod of the emulated KubeRay cluster: every container gets the catalog
/// volume, the Ray address and what Ray needs to run several nodes on one
/// host (all simulated nodes share 127.0.0.1).
fn ray_pod(name: &str, node: &str, containers: &[(&str, Vec<String>)], env: &[(&str, String)]) -> Pod {
    let mut vars: Vec<Value> = env.iter().map(|(k, v)| json!({"name": k, "value": v})).collect();
    vars.push(json!({"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}));
    vars.push(json!({"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}));
    let containers: Vec<Value> = containers
        .iter()
        .map(|(cname, command)| {
            json!({
                "name": cname, "image": "rayproject/ray", "command": command, "env": vars,
                "volumeMounts": [{"name": "models", "mountPath": "/mnt/models", "readOnly": true}]
            })
        })
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": {"ray.io/cluster": "raycluster"}},
        "spec": {
            "nodeName": node,
            "restartPolicy": "Never",
            "containers": containers,
            "volumes": [{"name": "models", "csi": {"driver": "csi.zerocopy.dev", "readOnly": true, "volumeAttributes": {"catalog": "true"}}}]
        }
    }))
    .unwrap()
}

/// An emulated KubeRay cluster: a head pod on node-1 (`ray start --head`
/// plus a `driver` container running `driver`), and one worker pod per other
/// node, started one at a time. Returns the GCS port.
struct RayCluster {
    gcs_port: u16,
    nodes: usize,
}

impl RayCluster {
    async fn start(
        env: &mut Env,
        shared: &Path,
        nodes: usize,
        head_cpus: u32,
        object_store: u64,
        driver: Vec<String>,
        extra_env: &[(&'static str, String)],
    ) -> RayCluster {
        let gcs_port = free_port();
        let mut ray_env: Vec<(&'static str, String)> = vec![
            ("MODELWRAPPER_CATALOG", "/mnt/models".into()),
            ("KUBECONFIG", env.cluster.kubeconfig.display().to_string()),
            ("PYTHONPATH", data_dir().display().to_string()),
            ("SHARED_DIR", shared.display().to_string()),
            ("RAY_ADDRESS", format!("127.0.0.1:{gcs_port}")),
            ("RAY_NODES", nodes.to_string()),
            // Several Ray nodes on one host, as the simulator's nodes are.
            ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "1".into()),
            ("RAY_AUTH_MODE", "disabled".into()),
        ];
        ray_env.extend_from_slice(extra_env);
        let ray = |args: &[&str]| -> Vec<String> {
            let mut v: Vec<String> = ["ray", "start", "--block", "--disable-usage-stats"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            v.push(format!("--object-store-memory={object_store}"));
            v.push(format!("--dashboard-agent-listen-port={}", free_port()));
            v.extend(args.iter().map(|s| s.to_string()));
            v
        };
        let ray_tmp = |pod: &str| -> Vec<(&'static str, String)> {
            // Each pod its own Ray temp dir, as each real pod has its own /tmp:
            // Ray names sockets by what exists there. Short: sockets live in it.
            let mut e = ray_env.clone();
            e.push(("RAY_TMPDIR", format!("/tmp/zc-ray-{gcs_port}-{pod}")));
            e
        };
        let pods: Api<Pod> = Api::namespaced(env.client.clone(), NS);
        let pp = PostParams::default();
        let head = ray(&[
            "--head",
            &format!("--port={gcs_port}"),
            &format!("--num-cpus={head_cpus}"),
            "--include-dashboard=false",
        ]);
        pods.create(
            &pp,
            &ray_pod(
                "raycluster-head",
                "node-1",
                &[("ray-head", head), ("driver", driver)],
                &ray_tmp("head"),
            ),
        )
        .await
        .unwrap();
        for i in 0..nodes - 1 {
            let name = format!("raycluster-worker-{i}");
            let worker = ray(&[&format!("--address=127.0.0.1:{gcs_port}"), "--num-cpus=2"]);
            pods.create(
                &pp,
                &ray_pod(
                    &name,
                    &format!("node-{}", i + 2),
                    &[("ray-worker", worker)],
                    &ray_tmp(&i.to_string()),
                ),
            )
            .await
            .unwrap();
            // One Ray node at a time, as an autoscaler adds them.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
            loop {
                let log = env.cluster.pod_log(NS, &name, "ray-worker").unwrap_or_default();
                if log.contains("Ray runtime started") {
                    break;
                }
                let head_log = env
                    .cluster
                    .pod_log(NS, "raycluster-head", "ray-head")
                    .unwrap_or_default();
                assert!(
                    !log.contains("Traceback") && !log.contains("Error:") && std::time::Instant::now() < deadline,
                    "{name}: ray start did not come up:\n{log}\nhead:\n{head_log}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
        RayCluster { gcs_port, nodes }
    }

    fn clean_up(&self) {
        let _ = std::fs::remove_dir_all(format!("/tmp/zc-ray-{}-head", self.gcs_port));
        for i in 0..self.nodes - 1 {
            let _ = std::fs::remove_dir_all(format!("/tmp/zc-ray-{}-{i}", self.gcs_port));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kuberay_cluster_runs_the_seeds_ray_data_workflow_with_one_copy_per_node() {
    let tmp = TmpfsDir::new();
    let mut env = start_env(&tmp, 4, &[]).await;
    let shared = tmp.path().join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    let driver = vec![
        "python3".to_string(),
        data_dir().join("ray_driver.py").display().to_string(),
    ];
    let ray = RayCluster::start(
        &mut env,
        &shared,
        4,
        1,
        80_000_000,
        driver,
        &[("RAY_WORKERS", "3".into())],
    )
    .await;
    let r = result_of_container(
        &mut env,
        NS,
        "raycluster-head",
        "driver",
        &shared.join("ray-result.json"),
        600,
    )
    .await;
    println!("seed workflow in the emulated KubeRay cluster: {r}");
    assert_eq!(r["rows"], 24, "{r}");
    assert_eq!(r["equal"], true, "actors' outputs differ from the driver's model: {r}");
    assert_eq!(
        r["tasks_equal"], true,
        "for_tasks(pipeline)(x) differs from pipeline(x): {r}"
    );
    assert_eq!(
        r["all_in_catalog"], true,
        "actors' tensors must lie in the catalog mount: {r}"
    );
    let actor_nodes = r["actor_nodes"].as_array().unwrap();
    assert!(
        !actor_nodes.is_empty() && !actor_nodes.contains(&r["driver_node"]),
        "map_batches actors run on workers: {r}"
    );
    assert_eq!(
        r["pinned_nodes"].as_array().unwrap().len(),
        3,
        "an actor on each worker node loaded: {r}"
    );
    assert_eq!(r["pinned_equal"], true, "{r}");
    assert_eq!(r["pinned_in_catalog"], true, "{r}");
    for node in ["node-1", "node-2", "node-3", "node-4"] {
        let gens = generations_on(&env.cluster, node);
        assert_eq!(gens.len(), 1, "{node}: one generation of the one wrapper, got {gens:?}");
    }
    env.stop().await;
    ray.clean_up();
}

/// Not a test: the benchmark of docs/benchmarks.md ("The seed's workflow on
/// four Ray nodes"). Needs ray-zerocopy 0.2.0 installed (`pip install
/// ray-zerocopy==0.2.0`) and about 12 GiB of free memory:
/// `BENCH_MB=1024 cargo test -p zerocopy-operator --test catalog_workflow -- --ignored --nocapture bench`
/// (`BENCH_OUT=docs/benchmarks-kuberay.json` keeps the numbers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: minutes and ~12 GiB; run by hand"]
async fn bench_seed_workflow_against_ray_zerocopy() {
    let mb: u64 = std::env::var("BENCH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let tmp = TmpfsDir::with_size("16g");
    let mut env = start_env(&tmp, 4, &[]).await;
    let shared = tmp.path().join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    let driver = vec![
        "python3".to_string(),
        data_dir().join("ray_bench.py").display().to_string(),
    ];
    // Ray's object store holds ray-zerocopy's copy on each node.
    let store = (mb + mb / 2 + 64) << 20;
    let ray = RayCluster::start(&mut env, &shared, 4, 2, store, driver, &[("BENCH_MB", mb.to_string())]).await;
    let mut r = result_of_container(
        &mut env,
        NS,
        "raycluster-head",
        "driver",
        &shared.join("bench.json"),
        1800,
    )
    .await;
    // Bytes the origin (the driver) sent: its uploads; the rest came from peers.
    let logs: Vec<String> = (1..=4)
        .filter_map(|i| env.cluster.node_dirs(&format!("node-{i}")))
        .map(|d| strip_ansi(&std::fs::read_to_string(d.base.join("agent.log")).unwrap_or_default()))
        .collect();
    let sum_logged = |needle: &str| -> u64 {
        logs.iter()
            .flat_map(|log| log.lines().filter(|l| l.contains(needle)))
            .filter_map(|l| {
                l.split(" bytes=")
                    .nth(1)?
                    .split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .sum()
    };
    r["zerocopy_origin_bytes"] = json!(sum_logged("upload verified"));
    r["zerocopy_peer_bytes"] = json!(sum_logged("serving a blob to a peer"));
    // What the nodes' roots hold at the end (shared memory).
    let du = |p: &Path| -> u64 {
        fn walk(p: &Path) -> u64 {
            let Ok(m) = std::fs::symlink_metadata(p) else { return 0 };
            if m.is_dir() {
                std::fs::read_dir(p)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| walk(&e.path()))
                    .sum()
            } else {
                m.len()
            }
        }
        walk(p)
    };
    r["zerocopy_node_roots_bytes"] = json!((1..=4)
        .filter_map(|i| env.cluster.node_dirs(&format!("node-{i}")))
        .map(|d| du(&d.root))
        .collect::<Vec<_>>());
    println!("{}", serde_json::to_string_pretty(&r).unwrap());
    if let Ok(out) = std::env::var("BENCH_OUT") {
        std::fs::write(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(out),
            serde_json::to_string_pretty(&r).unwrap(),
        )
        .unwrap();
    }
    env.stop().await;
    ray.clean_up();
}
