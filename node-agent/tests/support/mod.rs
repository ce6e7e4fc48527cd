//! A running `zerocopy-node-agent standalone --serve` and a CSI client that
//! talks to it over its real unix socket, as kubelet does.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)] // each test binary uses a subset

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use zerocopy_node_agent::csi::proto::identity_client::IdentityClient;
use zerocopy_node_agent::csi::proto::node_client::NodeClient;
use zerocopy_node_agent::csi::proto::volume_capability::{access_mode, AccessMode, AccessType, MountVolume};
use zerocopy_node_agent::csi::proto::{
    NodePublishVolumeRequest, NodeUnpublishVolumeRequest, ProbeRequest, VolumeCapability,
};

pub const BIN: &str = env!("CARGO_BIN_EXE_zerocopy-node-agent");

/// One agent process with its own root, state dir, socket and kubelet dir.
pub struct Agent {
    pub child: Option<Child>,
    pub root: PathBuf,
    pub state: PathBuf,
    pub socket: PathBuf,
    pub kubelet: PathBuf,
    pub metrics: String,
    yaml: PathBuf,
    extra: Vec<String>,
}

impl Agent {
    /// Starts an agent serving the wrappers in `yaml`, everything under `dir`.
    pub async fn start(dir: &Path, yaml: &Path, extra: &[&str]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut a = Agent {
            child: None,
            root: dir.join("root"),
            state: dir.join("state"),
            socket: dir.join("csi.sock"),
            kubelet: dir.join("kubelet"),
            metrics: format!("127.0.0.1:{port}"),
            yaml: yaml.to_path_buf(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        fs::create_dir_all(&a.kubelet).unwrap();
        a.spawn().await;
        a
    }

    /// (Re)starts the process and waits until Probe says ready.
    pub async fn spawn(&mut self) {
        let child = Command::new(BIN)
            .arg("--root")
            .arg(&self.root)
            .arg("--state-dir")
            .arg(&self.state)
            .arg("--csi-socket")
            .arg(&self.socket)
            .args([
                "--node-id",
                "node-a",
                "standalone",
                "-q",
                "--serve",
                "--watch-interval",
                "0.2",
            ])
            // A short publish wait unless the test sets its own.
            .args(if self.extra.iter().any(|a| a == "--publish-wait") {
                &[][..]
            } else {
                &["--publish-wait", "1"][..]
            })
            .arg("--kubelet-dir")
            .arg(&self.kubelet)
            .args(["--metrics-addr", &self.metrics])
            .args(&self.extra)
            .arg("-f")
            .arg(&self.yaml)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(channel) = connect(&self.socket).await {
                if let Ok(r) = IdentityClient::new(channel).probe(ProbeRequest {}).await {
                    if r.into_inner().ready == Some(true) {
                        return;
                    }
                }
            }
            assert!(Instant::now() < deadline, "agent did not become ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(connect(&self.socket).await.unwrap())
    }

    pub async fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(connect(&self.socket).await.unwrap())
    }

    pub fn sigkill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// Where kubelet would ask to mount volume `id`.
    pub fn target(&self, id: &str) -> PathBuf {
        self.kubelet
            .join(format!("pods/uid-{id}/volumes/kubernetes.io~csi/{id}/mount"))
    }

    /// Files in the ledger.
    pub fn ledger_len(&self) -> usize {
        fs::read_dir(self.state.join("publications"))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Waits until `path/manifest.json` of wrapper `ns/name` exists in some generation.
    pub async fn wait_generations(&self, ns: &str, name: &str, n: usize) -> Vec<PathBuf> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let gens: Vec<PathBuf> = fs::read_dir(self.root.join(ns).join(name))
                .map(|d| {
                    d.flatten()
                        .map(|e| e.path())
                        .filter(|p| p.join("manifest.json").exists())
                        .collect()
                })
                .unwrap_or_default();
            if gens.len() >= n {
                return gens;
            }
            assert!(
                Instant::now() < deadline,
                "generations of {ns}/{name} never reached {n}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn metrics_text(&self) -> String {
        let out = Command::new("python3")
            .args([
                "-c",
                &format!(
                    "import urllib.request;print(urllib.request.urlopen('http://{}/metrics').read().decode())",
                    self.metrics
                ),
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.sigkill();
    }
}

pub use zerocopy_node_agent::csi::client::connect;

/// The request kubelet sends for an ephemeral inline volume.
pub fn publish(id: &str, target: &Path, wrapper: &str, namespace: &str) -> NodePublishVolumeRequest {
    let mut ctx: HashMap<String, String> = HashMap::new();
    ctx.insert("modelWrapper".into(), wrapper.into());
    ctx.insert("csi.storage.k8s.io/pod.namespace".into(), namespace.into());
    ctx.insert("csi.storage.k8s.io/pod.name".into(), format!("pod-{id}"));
    ctx.insert("csi.storage.k8s.io/pod.uid".into(), format!("uid-{id}"));
    ctx.insert("csi.storage.k8s.io/serviceAccount.name".into(), "default".into());
    ctx.insert("csi.storage.k8s.io/ephemeral".into(), "true".into());
    NodePublishVolumeRequest {
        volume_id: id.into(),
        target_path: target.display().to_string(),
        readonly: true,
        volume_context: ctx,
        volume_capability: Some(VolumeCapability {
            access_type: Some(AccessType::Mount(MountVolume::default())),
            access_mode: Some(AccessMode {
                mode: access_mode::Mode::SingleNodeReaderOnly as i32,
            }),
        }),
        ..Default::default()
    }
}

/// The request kubelet sends for a namespace catalog volume.
pub fn publish_catalog(id: &str, target: &Path, namespace: &str) -> NodePublishVolumeRequest {
    let mut req = publish(id, target, "", namespace);
    req.volume_context.remove("modelWrapper");
    req.volume_context.insert("catalog".into(), "true".into());
    req
}

pub fn unpublish(id: &str, target: &Path) -> NodeUnpublishVolumeRequest {
    NodeUnpublishVolumeRequest {
        volume_id: id.into(),
        target_path: target.display().to_string(),
    }
}

/// Mount entries at exactly `path`.
pub fn mounts_at(path: &Path) -> usize {
    zerocopy_node_agent::mount::mounts()
        .unwrap()
        .into_iter()
        .filter(|m| m.mount_point == path)
        .count()
}

/// Mount entries below `dir`.
pub fn mounts_under(dir: &Path) -> usize {
    zerocopy_node_agent::mount::mounts()
        .unwrap()
        .into_iter()
        .filter(|m| m.mount_point.starts_with(dir))
        .count()
}

/// `Shmem:` of /proc/meminfo in bytes.
pub fn shmem() -> u64 {
    fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Shmem:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap()
        * 1024
}
