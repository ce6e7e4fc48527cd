//! A simulated cluster with real node agents in cluster mode and the real
//! operator binary, for the operator's whole-system tests.

#![allow(dead_code, unused_imports, clippy::unwrap_used, clippy::expect_used)] // each test binary uses a subset

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};
use serde_json::json;
pub use zerocopy_e2e::wait_for;
use zerocopy_e2e::{AgentMode, Cluster, ClusterOptions, NodeSpec};
use zerocopy_integration_tests::safetensors::{file, T};
use zerocopy_integration_tests::{agent_bin, sha256_hex};

pub const SYSTEM_NS: &str = "zerocopy-system";
pub const NS: &str = "ml";
pub const OPERATOR: &str = env!("CARGO_BIN_EXE_zerocopy-operator");

pub struct Env {
    pub cluster: Cluster,
    pub client: kube::Client,
    /// (identity, process) of each operator the test has not killed.
    pub operators: Vec<(String, Child)>,
    /// Extra arguments for every operator this Env starts.
    pub operator_args: Vec<String>,
    /// This test's slot among the simulated clusters allowed at once.
    _slot: tokio::sync::SemaphorePermit<'static>,
}

/// Simulated clusters a test binary runs at once. Each is an API server,
/// agents, operators and pod processes: two on a 2-core machine starve each
/// other's agents past their Lease, so tests take turns (one per 2 cores;
/// `ZEROCOPY_E2E_CLUSTERS` overrides). A test's bounds start counting once
/// it has its slot.
fn cluster_slots() -> &'static tokio::sync::Semaphore {
    static SLOTS: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
    SLOTS.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let slots = std::env::var("ZEROCOPY_E2E_CLUSTERS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or((cores / 2).max(1));
        tokio::sync::Semaphore::new(slots)
    })
}

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("127.0.0.1:{}", l.local_addr().unwrap().port())
}

impl Env {
    /// CRDs installed, namespaces created, nodes (with agents in cluster
    /// mode) added, and `operators` operator processes started.
    pub async fn start(nodes: Vec<NodeSpec>, operators: usize) -> Env {
        Self::start_with(nodes, operators, &[], &[]).await
    }

    /// As [`Env::start`], with extra operator and agent arguments.
    pub async fn start_with(
        nodes: Vec<NodeSpec>,
        operators: usize,
        operator_args: &[&str],
        agent_args: &[&str],
    ) -> Env {
        // Keep logs and node roots for a post-mortem: ZEROCOPY_E2E_DIR=/tmp/x cargo test ...
        let dir = std::env::var_os("ZEROCOPY_E2E_DIR").map(PathBuf::from);
        Self::start_in(dir, nodes, operators, operator_args, agent_args).await
    }

    /// As [`Env::start_with`], with the cluster's directory (node roots,
    /// sockets, logs) at `dir` (e.g. on a tmpfs, so roots are shared memory).
    pub async fn start_in(
        dir: Option<PathBuf>,
        nodes: Vec<NodeSpec>,
        operators: usize,
        operator_args: &[&str],
        agent_args: &[&str],
    ) -> Env {
        let slot = cluster_slots().acquire().await.expect("the slots are never closed");
        let mut opts = ClusterOptions::with_nodes(vec![]).agent(
            agent_bin(),
            AgentMode::Cluster {
                namespace: SYSTEM_NS.into(),
            },
        );
        opts.dir = dir;
        // The tests' models are files in the cluster's directory, which lies
        // there: the one host directory file:// sources may read.
        let models_dir = opts.dir.clone().unwrap_or_else(std::env::temp_dir);
        opts.agent_args = vec![
            "--renew-seconds".into(),
            "1".into(),
            "--allow-file-dir".into(),
            models_dir.display().to_string(),
        ];
        opts.agent_args.extend(agent_args.iter().map(|s| s.to_string()));
        let cluster = Cluster::start(opts).await.unwrap();
        let client = cluster.client().await.unwrap();
        let nss: Api<Namespace> = Api::all(client.clone());
        for ns in [SYSTEM_NS, NS] {
            nss.create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
            )
            .await
            .unwrap();
        }
        let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
        for entry in std::fs::read_dir(dir).unwrap() {
            let crd: CustomResourceDefinition =
                serde_yaml::from_str(&std::fs::read_to_string(entry.unwrap().path()).unwrap()).unwrap();
            crds.create(&PostParams::default(), &crd).await.unwrap();
        }
        for n in nodes {
            cluster.add_node(n).await.unwrap();
        }
        let mut env = Env {
            cluster,
            client,
            operators: vec![],
            operator_args: operator_args.iter().map(|s| s.to_string()).collect(),
            _slot: slot,
        };
        for i in 0..operators {
            env.start_operator(&format!("op-{i}"));
        }
        env
    }

    pub fn start_operator(&mut self, identity: &str) {
        let log = std::fs::File::create(self.cluster.dir.join(format!("{identity}.log"))).unwrap();
        let child = Command::new(OPERATOR)
            .arg("--kubeconfig")
            .arg(&self.cluster.kubeconfig)
            .args([
                "--namespace",
                SYSTEM_NS,
                "--agent-namespace",
                SYSTEM_NS,
                "--identity",
                identity,
            ])
            .args(["--metrics-addr", &free_addr(), "--log-format", "text"])
            .args(&self.operator_args)
            .env("RUST_LOG", "info,kube=warn")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        self.operators.push((identity.to_string(), child));
    }

    pub fn operator_log(&self, identity: &str) -> String {
        std::fs::read_to_string(self.cluster.dir.join(format!("{identity}.log"))).unwrap_or_default()
    }

    /// Creates ModelWrapper `name` in [`NS`] over a fresh one-tensor model of
    /// `floats` f32 (from `seed`), placed on every node; returns the API.
    pub async fn create_wrapper(&self, name: &str, floats: usize, seed: u32) -> Api<zerocopy_api::ModelWrapper> {
        let (src, sha, _) = model(&self.cluster.dir, &format!("{name}-{seed}.safetensors"), floats, seed);
        let wrappers: Api<zerocopy_api::ModelWrapper> = Api::namespaced(self.client.clone(), NS);
        wrappers
            .create(
                &PostParams::default(),
                &serde_json::from_value(wrapper(name, &src, &sha, json!({}), None)).unwrap(),
            )
            .await
            .unwrap();
        wrappers
    }

    /// Fails at once, with its log, when an operator process this test did
    /// not kill has exited: waiting out a bound on a dead process hides why.
    pub fn assert_operators_alive(&mut self) {
        let dead = self
            .operators
            .iter_mut()
            .find_map(|(id, c)| c.try_wait().ok().flatten().map(|s| (id.clone(), s)));
        if let Some((identity, status)) = dead {
            let log = self.operator_log(&identity);
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(40)..].join("\n");
            panic!("operator {identity} exited ({status}); last lines of its log:\n{tail}");
        }
    }

    /// [`wait_for`] that also fails fast when an operator died.
    pub async fn wait_alive<T, F, Fut>(&mut self, what: &str, secs: u64, f: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        zerocopy_e2e::wait_for_checked(what, secs, || self.assert_operators_alive(), f).await
    }

    pub fn kill_operator(&mut self, index: usize) {
        let (_, mut c) = self.operators.remove(index);
        let _ = c.kill();
        let _ = c.wait();
    }

    pub async fn stop(mut self) {
        while !self.operators.is_empty() {
            self.kill_operator(0);
        }
        self.cluster.shutdown().await;
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for (_, c) in &mut self.operators {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A safetensors model with one f32 tensor; returns (path, sha256 of the file,
/// sha256 of the tensor bytes).
pub fn model(dir: &Path, name: &str, floats: usize, seed: u32) -> (PathBuf, String, String) {
    let body = file(&[T::f32("w", floats, seed)]);
    let header_len = u64::from_le_bytes(body[..8].try_into().unwrap()) as usize;
    let data = &body[8 + header_len..];
    let path = dir.join(name);
    std::fs::write(&path, &body).unwrap();
    (path, sha256_hex(&body), sha256_hex(data))
}

pub fn wrapper(
    name: &str,
    source: &Path,
    sha: &str,
    selector: serde_json::Value,
    task: Option<serde_json::Value>,
) -> serde_json::Value {
    let mut w = json!({
        "apiVersion": "zerocopy.dev/v1alpha1",
        "kind": "ModelWrapper",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "pipeline": {"components": [{"name": "enc", "weights": {"uri": format!("file://{}", source.display()), "sha256": sha}}]},
            "nodeSelector": selector,
        }
    });
    if let Some(t) = task {
        w["spec"]["mode"] = json!("task");
        w["spec"]["task"] = json!({"template": t});
    }
    w
}

/// Generation directories with a manifest under a node's root.
pub fn generations_on(cluster: &Cluster, node: &str) -> Vec<String> {
    let Some(d) = cluster.node_dirs(node) else {
        return vec![];
    };
    let dir = d.root.join(NS);
    let mut out = Vec::new();
    for w in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        for g in std::fs::read_dir(w.path()).into_iter().flatten().flatten() {
            // `current` points at a generation; it is not one.
            if g.file_name() == "current" {
                continue;
            }
            if g.path().join("manifest.json").exists() {
                out.push(format!(
                    "{}/{}",
                    w.file_name().to_string_lossy(),
                    g.file_name().to_string_lossy()
                ));
            }
        }
    }
    out.sort();
    out
}

pub fn kubectl(kubeconfig: &Path, args: &[&str]) -> String {
    let bin = std::env::var_os("KUBECTL").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var("ZEROCOPY_TOOLS").unwrap_or("/var/tmp/zerocopy-tools".into())).join("bin/kubectl")
    });
    assert!(
        bin.exists(),
        "kubectl not found at {}: run scripts/k8s-tools.sh",
        bin.display()
    );
    let out = Command::new(bin)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
