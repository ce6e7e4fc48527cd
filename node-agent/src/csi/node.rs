//! CSI Node service: NodePublishVolume bind-mounts the newest Ready
//! generation of the wrapper read-only at the pod's target path;
//! NodeUnpublishVolume undoes it and frees a generation nobody needs.

use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::{Code, Request, Response, Status};

use super::catalog::{describe_progress, Catalog, FillState, WAITING_FOR_SOURCE};
use super::inflight::InFlight;
use super::ledger::{Ledger, Publication};
use super::metrics::Metrics;
use super::paths::{self, Invalid, PublishTarget};
use super::proto::node_server::Node;
use super::proto::{
    NodeGetCapabilitiesRequest, NodeGetCapabilitiesResponse, NodeGetInfoRequest, NodeGetInfoResponse,
    NodePublishVolumeRequest, NodePublishVolumeResponse, NodeStageVolumeRequest, NodeStageVolumeResponse,
    NodeUnpublishVolumeRequest, NodeUnpublishVolumeResponse, NodeUnstageVolumeRequest, NodeUnstageVolumeResponse,
};
use crate::layout::VolumeRoot;
use crate::mount;
use zerocopy_api::format::NODE_INFO_FILE;

/// How often a waiting publish re-reads fill progress.
const WAIT_POLL: Duration = Duration::from_millis(200);

/// Errors at the gRPC boundary; each maps to one code on purpose.
#[derive(Debug, thiserror::Error)]
pub enum CsiError {
    /// The request is wrong: InvalidArgument.
    #[error("{0}")]
    Invalid(String),
    /// No such ModelWrapper in the pod's namespace: NotFound.
    #[error("{0}")]
    NotFound(String),
    /// Still filling: Unavailable, retried by kubelet.
    #[error("{0}")]
    Filling(String),
    /// The fill failed, or the volume is published elsewhere: FailedPrecondition.
    #[error("{0}")]
    Precondition(String),
    /// Another operation on the same volume id is running: Aborted.
    #[error("an operation on volume {0} is already in progress; retry")]
    Busy(String),
    /// Mount or filesystem failure: Internal.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// Where.
        path: PathBuf,
        /// OS error.
        source: io::Error,
    },
}

impl CsiError {
    fn code(&self) -> Code {
        match self {
            CsiError::Invalid(_) => Code::InvalidArgument,
            CsiError::NotFound(_) => Code::NotFound,
            CsiError::Filling(_) => Code::Unavailable,
            CsiError::Precondition(_) => Code::FailedPrecondition,
            CsiError::Busy(_) => Code::Aborted,
            CsiError::Io { .. } => Code::Internal,
        }
    }

    /// Metric label.
    pub fn result(&self) -> &'static str {
        match self {
            CsiError::Invalid(_) => "invalid",
            CsiError::NotFound(_) => "not_found",
            CsiError::Filling(_) => "unavailable",
            CsiError::Precondition(_) => "failed_precondition",
            CsiError::Busy(_) => "aborted",
            CsiError::Io { .. } => "internal",
        }
    }
}

impl From<Invalid> for CsiError {
    fn from(e: Invalid) -> Self {
        CsiError::Invalid(e.0)
    }
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CsiError {
    let path = path.to_path_buf();
    move |source| CsiError::Io { action, path, source }
}

/// The Node service and everything it needs.
#[derive(Debug, Clone)]
pub struct NodeService {
    /// Reported by NodeGetInfo.
    pub node_id: String,
    /// Where generations live.
    pub root: VolumeRoot,
    /// Wanted generations and fill progress.
    pub catalog: Arc<Catalog>,
    /// Publications.
    pub ledger: Arc<Ledger>,
    /// One operation per volume id.
    pub inflight: InFlight,
    /// When set, targets must lie inside it.
    pub kubelet_dir: Option<PathBuf>,
    /// How long a publish waits for a fill before answering Unavailable.
    pub publish_wait: Duration,
    /// Counters and histograms.
    pub metrics: Metrics,
    /// Where this node's agent takes `from_model()` uploads
    /// (`http://<node address>:<port>`), told to catalog pods.
    pub upload_endpoint: Option<String>,
}

impl NodeService {
    /// NodePublishVolume without the gRPC wrapping.
    pub async fn publish(&self, req: &NodePublishVolumeRequest) -> Result<PathBuf, CsiError> {
        let t = paths::check_publish(
            &req.volume_id,
            &req.target_path,
            req.readonly,
            &req.volume_context,
            self.kubelet_dir.as_deref(),
        )?;
        let _guard = self
            .inflight
            .try_claim(&t.volume_id)
            .ok_or_else(|| CsiError::Busy(t.volume_id.clone()))?;
        if let Some(existing) = self.ledger.get(&t.volume_id) {
            if existing.target != t.target {
                return Err(CsiError::Precondition(format!(
                    "volume {} is already published at {}; unpublish it first",
                    t.volume_id,
                    existing.target.display()
                )));
            }
            if is_mounted(&t.target)? {
                return Ok(self
                    .root
                    .generation_dir(&existing.namespace, &existing.name, &existing.generation));
            }
        }
        if t.catalog {
            return tokio::task::block_in_place(|| self.publish_catalog(&t));
        }
        let wanted = self.catalog.wanted(&t.namespace, &t.wrapper).ok_or_else(|| {
            CsiError::NotFound(format!(
                "ModelWrapper {}/{} not found: the volume is looked up in the pod's own namespace; create the ModelWrapper there",
                t.namespace, t.wrapper
            ))
        })?;
        self.wait_ready(&t, &wanted.generation).await?;
        let source = self.root.generation_dir(&t.namespace, &t.wrapper, &wanted.generation);
        // Ledger fsyncs and mount syscalls block: keep them off the reactor
        // so one slow disk cannot stall every other CSI call and the fills.
        tokio::task::block_in_place(|| {
            self.ledger
                .insert(Publication {
                    volume_id: t.volume_id.clone(),
                    target: t.target.clone(),
                    namespace: t.namespace.clone(),
                    name: t.wrapper.clone(),
                    generation: wanted.generation.clone(),
                    catalog: false,
                    pod: t.pod.clone(),
                    pod_uid: t.pod_uid.clone(),
                    published_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                })
                .map_err(io_err("recording publication of", &t.target))?;
            if let Err(e) = self.mount(&source, &t.target) {
                let _ = self.ledger.remove(&t.volume_id);
                return Err(e);
            }
            Ok(source)
        })
    }

    /// The namespace catalog: a read-only recursive bind of
    /// `<root>/<namespace>`. Generations are published into that directory
    /// by rename (or as read-only binds when they have their own tmpfs), so
    /// ones that become Ready later appear in the running pod; nothing
    /// outside the namespace directory is reachable through it.
    fn publish_catalog(&self, t: &PublishTarget) -> Result<PathBuf, CsiError> {
        let source = self.root.path().join(&t.namespace);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&source)
            .map_err(io_err("creating namespace directory", &source))?;
        self.write_node_info(&source)?;
        self.ledger
            .insert(Publication {
                volume_id: t.volume_id.clone(),
                target: t.target.clone(),
                namespace: t.namespace.clone(),
                name: String::new(),
                generation: String::new(),
                catalog: true,
                pod: t.pod.clone(),
                pod_uid: t.pod_uid.clone(),
                published_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            })
            .map_err(io_err("recording publication of", &t.target))?;
        std::fs::create_dir_all(&t.target).map_err(io_err("creating target", &t.target))?;
        if !is_mounted(&t.target)? {
            if let Err(e) = mount::rbind_read_only(&source, &t.target, true) {
                let _ = self.ledger.remove(&t.volume_id);
                return Err(io_err("bind-mounting onto", &t.target)(e));
            }
        }
        Ok(source)
    }

    /// `<namespace>/.node.json`: the node a catalog pod runs on and where its
    /// agent takes uploads, for `from_model()` in that pod.
    fn write_node_info(&self, namespace_dir: &Path) -> Result<(), CsiError> {
        let info = serde_json::json!({
            "node": self.node_id,
            "uploadEndpoint": self.upload_endpoint,
        });
        let path = namespace_dir.join(NODE_INFO_FILE);
        let tmp = namespace_dir.join(format!("{NODE_INFO_FILE}.tmp"));
        std::fs::write(&tmp, info.to_string()).map_err(io_err("writing", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(io_err("writing", &path))
    }

    fn mount(&self, source: &Path, target: &Path) -> Result<(), CsiError> {
        std::fs::create_dir_all(target).map_err(io_err("creating target", target))?;
        if is_mounted(target)? {
            return Ok(()); // a previous attempt mounted it before the agent stopped
        }
        mount::bind_read_only(source, target, true).map_err(io_err("bind-mounting onto", target))
    }

    async fn wait_ready(&self, t: &PublishTarget, generation: &str) -> Result<(), CsiError> {
        let deadline = Instant::now() + self.publish_wait;
        loop {
            let notified = self.catalog.changed.notified();
            if self.root.read_manifest(&t.namespace, &t.wrapper, generation).is_some() {
                return Ok(());
            }
            let state = self.catalog.state(&t.namespace, &t.wrapper, generation);
            if let FillState::Failed(failure) = &state {
                if failure.reason == WAITING_FOR_SOURCE {
                    // An upload or a peer is coming: keep waiting.
                } else {
                    return Err(CsiError::Precondition(format!(
                        "{}/{}: fill failed: {}",
                        t.namespace,
                        t.wrapper,
                        failure.describe()
                    )));
                }
            }
            let now = Instant::now();
            if now >= deadline {
                let progress = match &state {
                    FillState::Filling(progress) => describe_progress(progress),
                    FillState::Failed(failure) => failure.message.clone(),
                    _ => "waiting for its fill to start".to_string(),
                };
                return Err(CsiError::Filling(format!(
                    "{}/{}: {progress}; kubelet retries",
                    t.namespace, t.wrapper
                )));
            }
            let _ = tokio::time::timeout((deadline - now).min(WAIT_POLL), notified).await;
        }
    }

    /// NodeUnpublishVolume without the gRPC wrapping.
    pub async fn unpublish(&self, volume_id: &str, target: &str) -> Result<(), CsiError> {
        if volume_id.is_empty() {
            return Err(CsiError::Invalid("volume_id is required".into()));
        }
        let target = paths::check_target(target, self.kubelet_dir.as_deref())?;
        let _guard = self
            .inflight
            .try_claim(volume_id)
            .ok_or_else(|| CsiError::Busy(volume_id.to_string()))?;
        // Unmount, ledger and GC touch the disk and /proc: off the reactor.
        tokio::task::block_in_place(|| {
            let record = self.ledger.get(volume_id);
            if is_mounted(&target)? {
                mount::unmount_lazy(&target).map_err(io_err("unmounting", &target))?;
            }
            match std::fs::remove_dir(&target) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(CsiError::Io {
                        action: "removing target",
                        path: target,
                        source: e,
                    })
                }
            }
            self.ledger
                .remove(volume_id)
                .map_err(io_err("forgetting publication of", &target))?;
            if let Some(r) = record {
                self.collect(&r.namespace, &r.name, &r.generation);
            }
            Ok(())
        })
    }

    /// Frees a generation that no wrapper wants and no publication mounts.
    pub fn collect(&self, namespace: &str, name: &str, generation: &str) {
        if self.catalog.is_wanted(namespace, name, generation) || self.ledger.references(namespace, name, generation) {
            return;
        }
        let entry = self.root.generations().ok().and_then(|gens| {
            gens.into_iter()
                .find(|g| g.namespace == namespace && g.name == name && g.generation == generation)
        });
        if let Some(entry) = entry {
            match self.root.remove_generation(&entry) {
                Ok(()) => tracing::info!(
                    namespace,
                    name,
                    generation,
                    "freed generation: no publication mounts it and no wrapper wants it"
                ),
                Err(e) => tracing::warn!(namespace, name, generation, error = %e, "could not free generation"),
            }
        }
    }

    fn finish<T>(
        &self,
        op: &'static str,
        volume_id: &str,
        started: Instant,
        result: Result<T, CsiError>,
    ) -> Result<T, Status> {
        let elapsed = started.elapsed().as_secs_f64();
        self.metrics.csi_seconds.with_label_values(&[op]).observe(elapsed);
        let counter = if op == "publish" {
            &self.metrics.publish_total
        } else {
            &self.metrics.unpublish_total
        };
        match result {
            Ok(v) => {
                counter.with_label_values(&["ok"]).inc();
                tracing::info!(op, volume_id, seconds = elapsed, "ok");
                Ok(v)
            }
            Err(e) => {
                counter.with_label_values(&[e.result()]).inc();
                // kubelet shows this message in the pod's events; log it here too
                if matches!(e, CsiError::Filling(_) | CsiError::Busy(_)) {
                    tracing::info!(op, volume_id, code = ?e.code(), error = %e, "not yet");
                } else {
                    tracing::warn!(op, volume_id, code = ?e.code(), error = %e, "failed");
                }
                Err(Status::new(e.code(), e.to_string()))
            }
        }
    }
}

fn is_mounted(path: &Path) -> Result<bool, CsiError> {
    Ok(mount::mount_at(path)
        .map_err(io_err("reading mountinfo for", path))?
        .is_some())
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        _: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "this driver serves ephemeral volumes only; it has no STAGE_UNSTAGE_VOLUME capability",
        ))
    }

    async fn node_unstage_volume(
        &self,
        _: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "this driver serves ephemeral volumes only; it has no STAGE_UNSTAGE_VOLUME capability",
        ))
    }

    async fn node_publish_volume(
        &self,
        req: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let started = Instant::now();
        let req = req.into_inner();
        let result = self.publish(&req).await.map(|_| NodePublishVolumeResponse {});
        self.finish("publish", &req.volume_id, started, result)
            .map(Response::new)
    }

    async fn node_unpublish_volume(
        &self,
        req: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let started = Instant::now();
        let req = req.into_inner();
        let result = self
            .unpublish(&req.volume_id, &req.target_path)
            .await
            .map(|_| NodeUnpublishVolumeResponse {});
        self.finish("unpublish", &req.volume_id, started, result)
            .map(Response::new)
    }

    async fn node_get_capabilities(
        &self,
        _: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        // No staging, stats or expansion: publish/unpublish is all there is.
        Ok(Response::new(NodeGetCapabilitiesResponse {
            capabilities: Vec::new(),
        }))
    }

    async fn node_get_info(&self, _: Request<NodeGetInfoRequest>) -> Result<Response<NodeGetInfoResponse>, Status> {
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: None,
        }))
    }
}
