//! A simulated cluster: the API server, the scheduler, the Job controller, and
//! nodes, each with a simulated kubelet and (optionally) a real
//! `zerocopy-node-agent` process with its own root, state dir, CSI socket and
//! kubelet dir.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::watch;

use crate::apiserver::store::{now, Sub};
use crate::apiserver::{ApiServer, ApiServerOptions, Store};
use crate::controllers::kubelet::{self, KubeletConfig};
use crate::controllers::{jobs, scheduler};

pub const DRIVER: &str = "csi.zerocopy.dev";

/// How a node's agent runs.
#[derive(Clone, Debug)]
pub enum AgentMode {
    /// `standalone --serve -f <node>/wrappers`: ModelWrapper YAML files the test
    /// writes into [`NodeDirs::wrappers`].
    Standalone,
    /// `run --kubeconfig ...`: the cluster mode, reading ModelReplicas from the API.
    Cluster { namespace: String },
    /// Exactly these arguments (e.g. a DaemonSet's), with `{root}`, `{state}`,
    /// `{socket}`, `{kubelet}`, `{metrics}`, `{node}` and `{kubeconfig}` replaced
    /// by the node's own.
    Args(Vec<String>),
}

#[derive(Clone, Debug)]
pub struct NodeSpec {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub taints: Vec<Value>,
    /// Run a real agent on this node (needs [`ClusterOptions::agent_bin`]).
    pub agent: bool,
    pub capacity: Option<String>,
}

impl NodeSpec {
    pub fn new(name: &str) -> Self {
        NodeSpec {
            name: name.into(),
            labels: BTreeMap::new(),
            taints: vec![],
            agent: true,
            capacity: None,
        }
    }

    pub fn label(mut self, k: &str, v: &str) -> Self {
        self.labels.insert(k.into(), v.into());
        self
    }

    pub fn without_agent(mut self) -> Self {
        self.agent = false;
        self
    }

    pub fn capacity(mut self, c: &str) -> Self {
        self.capacity = Some(c.into());
        self
    }

    pub fn taint(mut self, key: &str, value: &str, effect: &str) -> Self {
        self.taints.push(json!({"key": key, "value": value, "effect": effect}));
        self
    }
}

#[derive(Clone, Debug)]
pub struct ClusterOptions {
    pub nodes: Vec<NodeSpec>,
    pub agent_bin: Option<PathBuf>,
    pub agent_mode: AgentMode,
    /// Extra arguments for every agent (after the mode's own).
    pub agent_args: Vec<String>,
    pub api: ApiServerOptions,
    /// Create the `CSIDriver` object the Helm chart would (podInfoOnMount, Ephemeral).
    pub csi_driver_object: bool,
    /// Working directory; a temporary one (removed on drop) when None.
    pub dir: Option<PathBuf>,
    /// Agents authenticate as this service account (namespace, name) with a
    /// token bound to their node, as a DaemonSet pod's projected token is;
    /// None: the admin kubeconfig.
    pub agent_service_account: Option<(String, String)>,
}

impl ClusterOptions {
    /// `n` nodes named `node-1`..`node-n`, without agents.
    pub fn nodes(n: usize) -> Self {
        ClusterOptions {
            nodes: (1..=n).map(|i| NodeSpec::new(&format!("node-{i}"))).collect(),
            agent_bin: None,
            agent_mode: AgentMode::Standalone,
            agent_args: vec![],
            api: ApiServerOptions::default(),
            csi_driver_object: true,
            dir: None,
            agent_service_account: None,
        }
    }

    pub fn with_nodes(nodes: Vec<NodeSpec>) -> Self {
        ClusterOptions {
            nodes,
            ..Self::nodes(0)
        }
    }

    pub fn agent(mut self, bin: impl Into<PathBuf>, mode: AgentMode) -> Self {
        self.agent_bin = Some(bin.into());
        self.agent_mode = mode;
        self
    }
}

/// One node's directories.
#[derive(Clone, Debug)]
pub struct NodeDirs {
    pub base: PathBuf,
    pub root: PathBuf,
    pub state: PathBuf,
    pub socket: PathBuf,
    pub kubelet: PathBuf,
    pub logs: PathBuf,
    /// Standalone mode: the ModelWrapper YAML the agent serves.
    pub wrappers: PathBuf,
    pub metrics_addr: String,
}

struct SimNode {
    dirs: NodeDirs,
    spec: NodeSpec,
    agent: Option<tokio::process::Child>,
    kubelet_stop: watch::Sender<bool>,
    kubelet: tokio::task::JoinHandle<()>,
}

pub struct Cluster {
    pub api: ApiServer,
    pub kubeconfig: PathBuf,
    pub dir: PathBuf,
    _tempdir: Option<tempfile::TempDir>,
    opts: ClusterOptions,
    nodes: Mutex<BTreeMap<String, SimNode>>,
    shutdown: watch::Sender<bool>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

impl Cluster {
    /// Starts the API server, controllers and every node (agents included).
    pub async fn start(opts: ClusterOptions) -> anyhow::Result<Cluster> {
        let (tempdir, dir) = match &opts.dir {
            Some(d) => {
                std::fs::create_dir_all(d)?;
                (None, d.clone())
            }
            None => {
                let t = tempfile::Builder::new().prefix("zerocopy-sim-").tempdir()?;
                let p = t.path().to_path_buf();
                (Some(t), p)
            }
        };
        let api = ApiServer::start(opts.api.clone()).await?;
        let kubeconfig = api.write_kubeconfig(&dir.join("kubeconfig"))?;
        let (shutdown, rx) = watch::channel(false);
        tokio::spawn(scheduler::run(api.store.clone(), rx.clone()));
        tokio::spawn(jobs::run(api.store.clone(), rx));
        if opts.csi_driver_object {
            let t = api.store.resource_type("storage.k8s.io", "csidrivers")?;
            api.store.create(
                &t,
                "",
                json!({"apiVersion": "storage.k8s.io/v1", "kind": "CSIDriver", "metadata": {"name": DRIVER},
                    "spec": {"attachRequired": false, "podInfoOnMount": true, "volumeLifecycleModes": ["Ephemeral"]}}),
            )?;
        }
        let cluster = Cluster {
            api,
            kubeconfig,
            dir,
            _tempdir: tempdir,
            nodes: Mutex::new(BTreeMap::new()),
            shutdown,
            opts: opts.clone(),
        };
        for n in &opts.nodes {
            cluster.add_node(n.clone()).await?;
        }
        Ok(cluster)
    }

    /// Agent binary and mode for nodes added from now on.
    pub fn set_agent(&mut self, bin: PathBuf, mode: AgentMode) {
        self.opts.agent_bin = Some(bin);
        self.opts.agent_mode = mode;
    }

    pub fn store(&self) -> &Store {
        &self.api.store
    }

    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        Ok(self.api.client().await?)
    }

    pub fn node_dirs(&self, name: &str) -> Option<NodeDirs> {
        self.lock_nodes().get(name).map(|n| n.dirs.clone())
    }

    fn lock_nodes(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, SimNode>> {
        self.nodes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Creates the Node object, starts its kubelet and (if asked) its agent.
    pub async fn add_node(&self, spec: NodeSpec) -> anyhow::Result<NodeDirs> {
        let base = self.dir.join("nodes").join(&spec.name);
        let dirs = NodeDirs {
            root: base.join("root"),
            state: base.join("state"),
            socket: base.join("csi.sock"),
            kubelet: base.join("kubelet"),
            logs: base.join("logs"),
            wrappers: base.join("wrappers"),
            metrics_addr: format!("127.0.0.1:{}", free_port()),
            base,
        };
        for d in [&dirs.kubelet, &dirs.logs, &dirs.wrappers] {
            std::fs::create_dir_all(d)?;
        }
        let mut labels = spec.labels.clone();
        labels.insert("kubernetes.io/hostname".into(), spec.name.clone());
        labels.insert("kubernetes.io/os".into(), "linux".into());
        let nodes_t = self.store().resource_type("", "nodes")?;
        let node = json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": spec.name, "labels": labels},
            "spec": {"taints": spec.taints},
            "status": {
                "capacity": {"memory": "24Gi", "cpu": "2", "pods": "110"},
                "allocatable": {"memory": "24Gi", "cpu": "2", "pods": "110"},
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "simulated kubelet is posting ready status",
                    "lastHeartbeatTime": now(), "lastTransitionTime": now()}],
                "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": spec.name}],
                "nodeInfo": {"kubeletVersion": "v1.33.0-zerocopy-sim", "operatingSystem": "linux", "architecture": "amd64"}
            }
        });
        self.store().create(&nodes_t, "", node)?;
        let mut drivers = BTreeMap::new();
        let agent = if spec.agent {
            if let Some(bin) = &self.opts.agent_bin {
                drivers.insert(DRIVER.to_string(), dirs.socket.clone());
                Some(self.spawn_agent(bin, &spec, &dirs)?)
            } else {
                None
            }
        } else {
            None
        };
        self.api.logs.register(&spec.name, dirs.logs.clone());
        let cfg = KubeletConfig {
            node: spec.name.clone(),
            kubelet_dir: dirs.kubelet.clone(),
            log_dir: dirs.logs.clone(),
            csi_drivers: drivers,
        };
        let (kubelet_stop, rx) = watch::channel(false);
        let kubelet = tokio::spawn(kubelet::run(self.store().clone(), cfg, rx));
        self.lock_nodes().insert(
            spec.name.clone(),
            SimNode {
                dirs: dirs.clone(),
                spec,
                agent,
                kubelet_stop,
                kubelet,
            },
        );
        Ok(dirs)
    }

    /// Agents from now on authenticate as this service account, each with a
    /// token bound to its node.
    pub fn set_agent_service_account(&mut self, namespace: &str, name: &str) {
        self.opts.agent_service_account = Some((namespace.into(), name.into()));
    }

    /// A kubeconfig for the service account `namespace/name`, its token bound to `node` when given.
    pub fn service_account_kubeconfig(
        &self,
        namespace: &str,
        name: &str,
        node: Option<&str>,
    ) -> anyhow::Result<PathBuf> {
        let file = format!("kubeconfig-{namespace}-{name}-{}", node.unwrap_or("unbound"));
        Ok(self
            .api
            .service_account_kubeconfig(&self.dir.join("tokens").join(file), namespace, name, node)?)
    }

    /// A kubeconfig for a plain user (tenant tests).
    pub fn user_kubeconfig(&self, username: &str, groups: &[&str]) -> anyhow::Result<PathBuf> {
        let path = self.dir.join("tokens").join(format!("kubeconfig-user-{username}"));
        Ok(self.api.user_kubeconfig(&path, username, groups)?)
    }

    /// The kubeconfig a node's agent uses.
    fn agent_kubeconfig(&self, node: &str) -> anyhow::Result<PathBuf> {
        match &self.opts.agent_service_account {
            Some((ns, name)) => self.service_account_kubeconfig(ns, name, Some(node)),
            None => Ok(self.kubeconfig.clone()),
        }
    }

    fn spawn_agent(&self, bin: &Path, spec: &NodeSpec, dirs: &NodeDirs) -> anyhow::Result<tokio::process::Child> {
        let mut cmd = tokio::process::Command::new(bin);
        let kubeconfig = self.agent_kubeconfig(&spec.name)?;
        if let AgentMode::Args(template) = &self.opts.agent_mode {
            for a in template {
                cmd.arg(
                    a.replace("{root}", &dirs.root.display().to_string())
                        .replace("{state}", &dirs.state.display().to_string())
                        .replace("{socket}", &dirs.socket.display().to_string())
                        .replace("{kubelet}", &dirs.kubelet.display().to_string())
                        .replace("{metrics}", &dirs.metrics_addr)
                        .replace("{node}", &spec.name)
                        .replace("{kubeconfig}", &kubeconfig.display().to_string()),
                );
            }
            let log = std::fs::File::create(dirs.base.join("agent.log"))?;
            cmd.stdout(Stdio::from(log.try_clone()?))
                .stderr(Stdio::from(log))
                .kill_on_drop(true);
            return Ok(cmd.spawn()?);
        }
        cmd.arg("--root")
            .arg(&dirs.root)
            .arg("--state-dir")
            .arg(&dirs.state)
            .arg("--csi-socket")
            .arg(&dirs.socket)
            .args(["--node-id", &spec.name]);
        match &self.opts.agent_mode {
            AgentMode::Standalone => {
                cmd.args([
                    "standalone",
                    "-q",
                    "--serve",
                    "--watch-interval",
                    "0.2",
                    "--publish-wait",
                    "1",
                    "-f",
                ])
                .arg(&dirs.wrappers);
            }
            AgentMode::Cluster { namespace } => {
                cmd.arg("run")
                    .arg("--kubeconfig")
                    .arg(&kubeconfig)
                    .args(["--namespace", namespace]);
            }
            AgentMode::Args(_) => {}
        }
        cmd.arg("--kubelet-dir")
            .arg(&dirs.kubelet)
            .args(["--metrics-addr", &dirs.metrics_addr]);
        if let Some(c) = &spec.capacity {
            cmd.args(["--capacity", c]);
        }
        cmd.args(&self.opts.agent_args);
        let log = std::fs::File::create(dirs.base.join("agent.log"))?;
        cmd.stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        Ok(cmd.spawn()?)
    }

    /// Restarts a node's agent process (SIGKILL, then a fresh start).
    pub async fn restart_agent(&self, name: &str) -> anyhow::Result<()> {
        let bin = self
            .opts
            .agent_bin
            .clone()
            .ok_or_else(|| anyhow::anyhow!("no agent binary"))?;
        let (spec, dirs, old) = {
            let mut nodes = self.lock_nodes();
            let n = nodes.get_mut(name).ok_or_else(|| anyhow::anyhow!("no node {name}"))?;
            (n.spec.clone(), n.dirs.clone(), n.agent.take())
        };
        if let Some(mut child) = old {
            let _ = child.kill().await;
        }
        let child = self.spawn_agent(&bin, &spec, &dirs)?;
        if let Some(n) = self.lock_nodes().get_mut(name) {
            n.agent = Some(child);
        }
        Ok(())
    }

    /// Marks a node NotReady (or Ready again), as the node lifecycle controller would.
    pub fn set_node_ready(&self, name: &str, ready: bool) -> anyhow::Result<()> {
        let t = self.store().resource_type("", "nodes")?;
        self.store().modify(&t, "", name, Sub::Status, |n| {
            n["status"]["conditions"][0]["status"] = json!(if ready { "True" } else { "False" });
            n["status"]["conditions"][0]["lastTransitionTime"] = json!(now());
        })?;
        Ok(())
    }

    /// Removes a node: its agent and kubelet stop, its pods are deleted, then the Node object.
    pub async fn remove_node(&self, name: &str) -> anyhow::Result<()> {
        let node = self.lock_nodes().remove(name);
        if let Some(mut n) = node {
            let _ = n.kubelet_stop.send(true);
            let _ = n.kubelet.await;
            if let Some(mut a) = n.agent.take() {
                let _ = a.kill().await;
            }
        }
        let pods_t = self.store().resource_type("", "pods")?;
        let (pods, _, _) = self.store().list(&pods_t, None, &Default::default())?;
        for p in pods.iter().filter(|p| p["spec"]["nodeName"] == name) {
            let ns = p["metadata"]["namespace"].as_str().unwrap_or("");
            let pname = p["metadata"]["name"].as_str().unwrap_or("");
            let _ = self.store().delete(&pods_t, ns, pname, None, true, None);
        }
        let nodes_t = self.store().resource_type("", "nodes")?;
        let _ = self.store().delete(&nodes_t, "", name, None, true, None);
        Ok(())
    }

    /// A container's log (stdout and stderr), from the kubelet of the pod's node.
    pub fn pod_log(&self, namespace: &str, pod: &str, container: &str) -> Option<String> {
        let t = self.store().resource_type("", "pods").ok()?;
        let p = self.store().get(&t, namespace, pod).ok()?;
        let path = self
            .api
            .logs
            .path(p["spec"]["nodeName"].as_str()?, namespace, pod, container)?;
        std::fs::read_to_string(path).ok()
    }

    /// Stops everything and unmounts what the agents and pods left under the
    /// cluster directory (volumes outlive their agents on purpose).
    pub async fn shutdown(&self) {
        let _ = self.shutdown.send(true);
        let nodes: Vec<SimNode> = std::mem::take(&mut *self.lock_nodes()).into_values().collect();
        for mut n in nodes {
            let _ = n.kubelet_stop.send(true);
            let _ = tokio::time::timeout(Duration::from_secs(10), &mut n.kubelet).await;
            if let Some(mut a) = n.agent.take() {
                let _ = a.kill().await;
            }
        }
        self.api.stop();
        unmount_below(&self.dir);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        for n in self.lock_nodes().values_mut() {
            let _ = n.kubelet_stop.send(true);
            if let Some(a) = n.agent.as_mut() {
                let _ = a.start_kill();
            }
        }
        unmount_below(&self.dir);
    }
}

/// Lazily unmounts every mount point below `dir`, deepest first.
pub fn unmount_below(dir: &Path) {
    let Ok(mounts) = zerocopy_node_agent::mount::mounts() else {
        return;
    };
    let mut points: Vec<PathBuf> = mounts
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p.starts_with(dir) && p != dir)
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
    }
}
