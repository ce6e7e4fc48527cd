//! `run`: the node agent in a cluster. It keeps a Lease named after its node
//! (presence, capacity and use), watches the ModelReplicas labelled with its
//! node, fills them with the same engine and CSI server as `standalone
//! --serve`, writes each replica's status (at most about once a second), and
//! frees generations no replica wants and no pod mounts.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::ResourceExt;
use serde_json::json;
use zerocopy_api::format::generation_digest;
use zerocopy_api::labels::{
    AGENT_MANAGER, LEASE_CAPACITY, LEASE_CONSUMERS, LEASE_USED, NODE_LABEL, UPLOAD_TOKEN_ANNOTATION,
};
use zerocopy_api::{ModelReplica, ModelReplicaStatus, ModelWrapper, ReplicaPhase};

use crate::csi::catalog::{describe_progress, FillState, WAITING_FOR_SOURCE};
use crate::fill::FillEngine;
use crate::layout::VolumeRoot;
use crate::manifests::LoadedWrapper;
use crate::peer::{PeerDirectory, PeerView};
use crate::serve::{serve_wanted, ServeOptions, Shared};

/// Settings of `run`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The node this agent serves (`--node-id`).
    pub node: String,
    /// Namespace of the agent Leases.
    pub lease_namespace: String,
    /// Capacity advertised on the Lease.
    pub capacity: Option<u64>,
    /// How often the Lease is renewed; it expires after three times this.
    pub renew_every: Duration,
    /// How often replica status is written at most.
    pub status_every: Duration,
    /// How long a namespace or wrapper stays listed as consumed on this
    /// node after its last pod here unmounted it.
    pub consumer_grace: Duration,
}

/// Why `run` stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Serving CSI / filling.
    #[error(transparent)]
    Serve(#[from] crate::serve::ServeError),
}

/// How long a node waits for nodes ordered before it to fetch a generation
/// from the origin before fetching it itself (one of them may be gone).
pub const EARLIER_FILLER_WAIT: Duration = Duration::from_secs(120);

/// Other nodes' copies, from the ModelReplicas of every node (their status
/// is written by their agents only: phase, and the endpoint to read from).
#[derive(Default)]
pub struct ReplicaPeers {
    node: String,
    store: std::sync::OnceLock<Store<ModelReplica>>,
    waiting_since: std::sync::Mutex<BTreeMap<(String, String, String), std::time::Instant>>,
}

impl ReplicaPeers {
    /// Peers as seen from `node`.
    pub fn new(node: impl Into<String>) -> Self {
        Self {
            node: node.into(),
            ..Default::default()
        }
    }

    fn attach(&self, store: Store<ModelReplica>) {
        let _ = self.store.set(store);
    }
}

impl PeerDirectory for ReplicaPeers {
    fn view(&self, namespace: &str, name: &str, generation: &str) -> PeerView {
        let Some(store) = self.store.get() else {
            return PeerView::default();
        };
        let replicas = store.state();
        let mut view = peer_view(&self.node, namespace, name, generation, &replicas);
        // Nodes ordered earlier fetch from the origin first, for a while.
        let key = (namespace.to_string(), name.to_string(), generation.to_string());
        let mut waiting = self.waiting_since.lock().unwrap_or_else(|e| e.into_inner());
        if (view.earlier_fillers.is_empty() && !view.catching_up) || !view.ready.is_empty() {
            waiting.remove(&key);
        } else {
            let since = *waiting.entry(key).or_insert_with(std::time::Instant::now);
            if since.elapsed() > EARLIER_FILLER_WAIT {
                tracing::warn!(namespace, name, generation, nodes = ?view.earlier_fillers,
                    "nodes ordered earlier did not fill it in time; fetching from the origin");
                view.earlier_fillers.clear();
                view.catching_up = false;
            }
        }
        view
    }
}

/// Pure: which other nodes hold `generation` Ready (with an endpoint), and
/// which nodes named before `me` are still going to fill it (not Failed).
pub fn peer_view(me: &str, namespace: &str, name: &str, generation: &str, replicas: &[Arc<ModelReplica>]) -> PeerView {
    // Replicas are created in node-name order, and a watch delivers them in
    // order: once this node's own replica is listed, earlier ones are too.
    let mut view = PeerView {
        catching_up: !replicas.iter().any(|r| {
            r.namespace().as_deref() == Some(namespace)
                && r.spec.wrapper == name
                && r.spec.generation == generation
                && r.spec.node == me
        }),
        ..Default::default()
    };
    let mut mine: Vec<&ModelReplica> = replicas
        .iter()
        .map(|r| r.as_ref())
        .filter(|r| {
            r.namespace().as_deref() == Some(namespace)
                && r.spec.wrapper == name
                && r.spec.generation == generation
                && r.spec.node != me
                && r.metadata.deletion_timestamp.is_none()
        })
        .collect();
    mine.sort_by(|a, b| a.spec.node.cmp(&b.spec.node));
    for r in mine {
        let status = r.status.as_ref();
        let phase = status.map(|s| s.phase);
        let endpoint = status.and_then(|s| s.endpoint.clone());
        let holds = status.and_then(|s| s.digest.as_deref()) == Some(generation);
        match (phase, endpoint) {
            (Some(ReplicaPhase::Ready), Some(ep)) if holds => view.ready.push((r.spec.node.clone(), ep)),
            // Failed, or Ready without a peer server: nothing to wait for.
            (Some(ReplicaPhase::Failed | ReplicaPhase::Ready), _) => {}
            _ if r.spec.node.as_str() < me => view.earlier_fillers.push(r.spec.node.clone()),
            _ => {}
        }
    }
    view
}

/// The wrapper a replica asks this node to hold, in the form the fill loop takes.
pub fn wanted_from(replica: &ModelReplica) -> Option<LoadedWrapper> {
    let ns = replica.namespace()?;
    let spec = replica.spec.wrapper_spec();
    let computed = generation_digest(&spec);
    if computed != replica.spec.generation {
        tracing::warn!(replica = %replica.name_any(), operator = %replica.spec.generation, agent = %computed,
            "generation digest differs between operator and agent (version skew?); using the agent's");
    }
    let mut wrapper = ModelWrapper::new(&replica.spec.wrapper, spec);
    wrapper.metadata.namespace = Some(ns.clone());
    // Who may upload its `upload:` sources (the operator copies it over).
    if let Some(token) = replica.annotations().get(UPLOAD_TOKEN_ANNOTATION) {
        wrapper.metadata.annotations = Some(BTreeMap::from([(UPLOAD_TOKEN_ANNOTATION.to_string(), token.clone())]));
    }
    Some(LoadedWrapper {
        file: PathBuf::from(format!("modelreplica/{ns}/{}", replica.name_any())),
        namespace: ns,
        name: replica.spec.wrapper.clone(),
        wrapper,
    })
}

/// Most in-flight files a replica status lists (a fill runs a few at once;
/// the rest are counted).
const MAX_FILES_IN_STATUS: usize = 16;

/// A replica's status from the node's state (pure but for the manifest read).
pub fn replica_status(replica: &ModelReplica, shared: &Shared, root: &VolumeRoot) -> ModelReplicaStatus {
    let ns = replica.namespace().unwrap_or_default();
    let name = &replica.spec.wrapper;
    let generation = generation_digest(&replica.spec.wrapper_spec());
    let mounts = shared
        .ledger
        .all()
        .iter()
        .filter(|p| p.namespace == ns && &p.name == name)
        .count() as u32;
    let mut s = ModelReplicaStatus {
        generation: Some(generation.clone()),
        mounts,
        endpoint: shared.endpoint.clone(),
        ..Default::default()
    };
    match shared.catalog.state(&ns, name, &generation) {
        FillState::Pending => s.phase = ReplicaPhase::Pending,
        FillState::Filling(progress) => {
            s.phase = ReplicaPhase::Filling;
            s.bytes_done = progress.bytes_done();
            s.bytes_total = progress.bytes_expected();
            s.files_total = progress.files_total.max(progress.files.len()) as u32;
            s.files_done = progress.files_done() as u32;
            s.filling = progress
                .in_flight()
                .take(MAX_FILES_IN_STATUS)
                .map(|f| zerocopy_api::replica::FileProgress {
                    file: f.file.clone(),
                    bytes_done: f.done,
                    bytes_total: f.total,
                })
                .collect();
            s.message = Some(describe_progress(&progress));
        }
        FillState::Ready => {
            s.phase = ReplicaPhase::Ready;
            let manifest = root.read_manifest(&ns, name, &generation);
            let total = manifest.as_ref().map_or(0, |m| m.total_bytes);
            s.revisions = manifest
                .iter()
                .flat_map(|m| &m.components)
                .filter_map(|c| Some((c.name.clone(), c.directory.as_ref()?.revision.clone()?)))
                .collect();
            s.bytes_total = total;
            s.bytes_done = total;
            s.digest = Some(generation);
        }
        FillState::Failed(failure) if failure.reason == WAITING_FOR_SOURCE => {
            s.phase = ReplicaPhase::Pending;
            s.message = Some(failure.message);
            s.reason = Some(failure.reason.to_string());
        }
        FillState::Failed(failure) => {
            s.phase = ReplicaPhase::Failed;
            s.message = Some(failure.message);
            s.reason = Some(failure.reason.to_string());
            s.attempts = Some(failure.attempts);
            s.next_retry_time = failure
                .retry_at
                .map(|t| chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
        }
    }
    s
}

/// Consumers seen on this node and when last, for the Lease annotation.
#[derive(Debug, Default)]
pub struct Consumers {
    last_seen: BTreeMap<String, std::time::Instant>,
}

impl Consumers {
    /// Records the publications now and returns what to report: everything
    /// seen within `grace`, sorted, comma-separated.
    pub fn update(&mut self, publications: &[crate::csi::ledger::Publication], grace: Duration) -> String {
        let now = std::time::Instant::now();
        for p in publications {
            let key = if p.catalog {
                p.namespace.clone()
            } else {
                format!("{}/{}", p.namespace, p.name)
            };
            self.last_seen.insert(key, now);
        }
        self.last_seen.retain(|_, seen| now.duration_since(*seen) <= grace);
        self.last_seen.keys().cloned().collect::<Vec<_>>().join(",")
    }
}

async fn renew_lease(
    client: kube::Client,
    opts: RunOptions,
    root: VolumeRoot,
    mut shared: tokio::sync::watch::Receiver<Option<Shared>>,
) {
    let api: Api<Lease> = Api::namespaced(client, &opts.lease_namespace);
    let mut consumers = Consumers::default();
    let mut reported: Option<String> = None;
    let mut renewed_at: Option<std::time::Instant> = None;
    loop {
        // Looked at every second, written when due or when consumers
        // changed, so placement follows a new consumer within about a second.
        // Not before the ledger is loaded: an empty consumer list would make
        // the operator take `placement: Consumers` wrappers off this node.
        let Some(publications) = shared.borrow_and_update().as_ref().map(|s| s.ledger.all()) else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let now_consuming = consumers.update(&publications, opts.consumer_grace);
        let due = renewed_at.is_none_or(|t| t.elapsed() >= opts.renew_every);
        if !due && reported.as_deref() == Some(now_consuming.as_str()) {
            tokio::time::sleep(Duration::from_secs(1).min(opts.renew_every)).await;
            continue;
        }
        let used = root.used_bytes().unwrap_or(0);
        let mut annotations = BTreeMap::from([(LEASE_USED.to_string(), used.to_string())]);
        annotations.insert(LEASE_CONSUMERS.to_string(), now_consuming.clone());
        if let Some(c) = opts.capacity {
            annotations.insert(LEASE_CAPACITY.to_string(), c.to_string());
        }
        let lease = json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": opts.node, "annotations": annotations},
            "spec": {
                "holderIdentity": opts.node,
                "leaseDurationSeconds": (opts.renew_every.as_secs().max(1) * 3) as i32,
                "renewTime": MicroTime(Timestamp::now()),
            }
        });
        if let Err(e) = api
            .patch(
                &opts.node,
                &PatchParams::apply(AGENT_MANAGER).force(),
                &Patch::Apply(&lease),
            )
            .await
        {
            tracing::warn!(error = %e, "could not renew the node Lease");
        } else {
            reported = Some(now_consuming);
            renewed_at = Some(std::time::Instant::now());
        }
        tokio::time::sleep(Duration::from_secs(1).min(opts.renew_every)).await;
    }
}

async fn write_statuses(
    client: kube::Client,
    store: Store<ModelReplica>,
    shared: Shared,
    root: VolumeRoot,
    every: Duration,
) {
    let mut written: BTreeMap<(String, String), ModelReplicaStatus> = BTreeMap::new();
    loop {
        let replicas = store.state();
        for r in &replicas {
            let ns = r.namespace().unwrap_or_default();
            let status = replica_status(r, &shared, &root);
            let key = (ns.clone(), r.name_any());
            // Compare with what we wrote and with what the cache holds, so a
            // restart does not rewrite unchanged statuses.
            if written.get(&key) == Some(&status) || r.status.as_ref() == Some(&status) {
                written.insert(key, status);
                continue;
            }
            let api: Api<ModelReplica> = Api::namespaced(client.clone(), &ns);
            let body = json!({"apiVersion": "zerocopy.dev/v1alpha1", "kind": "ModelReplica", "metadata": {"name": r.name_any()}, "status": status});
            match api
                .patch_status(
                    &r.name_any(),
                    &PatchParams::apply(AGENT_MANAGER).force(),
                    &Patch::Apply(&body),
                )
                .await
            {
                Ok(_) => {
                    written.insert(key, status);
                }
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => tracing::warn!(replica = %r.name_any(), error = %e, "could not write replica status"),
            }
        }
        // Forget replicas that are gone, from the same snapshot.
        let present: std::collections::BTreeSet<(String, String)> = replicas
            .iter()
            .map(|r| (r.namespace().unwrap_or_default(), r.name_any()))
            .collect();
        written.retain(|key, _| present.contains(key));
        tokio::select! {
            _ = shared.catalog.changed.notified() => tokio::time::sleep(every).await,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// Runs until `shutdown` resolves.
pub async fn run(
    client: kube::Client,
    engine: Arc<FillEngine>,
    serve: ServeOptions,
    opts: RunOptions,
    peers: Option<Arc<ReplicaPeers>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let root = engine.root().clone();
    let (shared_tx, shared_rx) = tokio::sync::watch::channel(None::<Shared>);
    tokio::spawn(renew_lease(client.clone(), opts.clone(), root.clone(), shared_rx));
    if let Some(peers) = peers {
        let (all, writer) = reflector::store::<ModelReplica>();
        let api: Api<ModelReplica> = Api::all(client.clone());
        tokio::spawn(async move {
            let mut events = reflector::reflector(writer, watcher(api, watcher::Config::default()))
                .default_backoff()
                .boxed();
            while let Some(ev) = events.next().await {
                if let Err(e) = ev {
                    tracing::warn!(error = %e, "watching every node's ModelReplicas (peers)");
                }
            }
        });
        peers.attach(all);
    }

    let (store, writer) = reflector::store::<ModelReplica>();
    let api: Api<ModelReplica> = Api::all(client.clone());
    let config = watcher::Config::default().labels(&format!("{NODE_LABEL}={}", opts.node));
    let (tx, rx) = tokio::sync::watch::channel(Vec::<LoadedWrapper>::new());
    let watch_store = store.clone();
    let mut synced = rx.clone();
    tokio::spawn(async move {
        let mut first = true;
        let mut events = reflector::reflector(writer, watcher(api, config))
            .default_backoff()
            .boxed();
        while let Some(ev) = events.next().await {
            match ev {
                Ok(watcher::Event::InitDone | watcher::Event::Apply(_) | watcher::Event::Delete(_)) => {
                    let mut wanted: Vec<LoadedWrapper> = Vec::new();
                    let mut replicas = watch_store.state();
                    replicas.sort_by_key(|r| (r.namespace(), r.name_any()));
                    for r in replicas.iter().filter(|r| r.metadata.deletion_timestamp.is_none()) {
                        if let Some(w) = wanted_from(r) {
                            if !wanted.iter().any(|x| x.namespace == w.namespace && x.name == w.name) {
                                wanted.push(w);
                            }
                        }
                    }
                    let changed = {
                        let current = tx.borrow();
                        current.len() != wanted.len()
                            || current.iter().zip(&wanted).any(|(a, b)| {
                                a.namespace != b.namespace
                                    || a.name != b.name
                                    || a.wrapper.spec != b.wrapper.spec
                                    || a.wrapper.metadata.annotations != b.wrapper.metadata.annotations
                            })
                    };
                    if changed || first {
                        tracing::info!(replicas = wanted.len(), "replicas for this node changed");
                        let _ = tx.send(wanted);
                        first = false;
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "watching ModelReplicas"),
            }
        }
    });
    // Nothing is filled or pruned before the first full list: an empty set
    // would otherwise free every unmounted generation after a restart.
    let _ = synced.changed().await;
    tracing::info!(replicas = synced.borrow().len(), "replicas listed; serving");
    let status_every = opts.status_every;
    let status_client = client.clone();
    let status_root = root.clone();
    serve_wanted(
        engine,
        serve,
        rx,
        move |shared| {
            let _ = shared_tx.send(Some(shared.clone()));
            tokio::spawn(write_statuses(status_client, store, shared, status_root, status_every));
        },
        shutdown,
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerocopy_api::ModelReplicaSpec;

    fn replica(node: &str, phase: Option<ReplicaPhase>, endpoint: Option<&str>) -> Arc<ModelReplica> {
        let spec: ModelReplicaSpec = serde_json::from_value(json!({
            "wrapper": "m", "node": node, "generation": "g1",
            "pipeline": {"components": [{"name": "enc", "weights": {"uri": "upload:", "sha256": "0".repeat(64)}}]}
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        let mut r = ModelReplica::new(&format!("m-{node}"), spec);
        r.metadata.namespace = Some("ns".into());
        r.status = phase.map(|phase| ModelReplicaStatus {
            phase,
            digest: (phase == ReplicaPhase::Ready).then(|| "g1".to_string()),
            endpoint: endpoint.map(String::from),
            ..Default::default()
        });
        Arc::new(r)
    }

    #[test]
    fn a_filling_replica_reports_its_files() {
        use crate::fill::ProgressFactory;
        let state = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (ledger, _) = crate::csi::ledger::Ledger::load(state.path()).unwrap_or_else(|e| panic!("{e}"));
        let shared = Shared {
            catalog: Arc::new(crate::csi::catalog::Catalog::default()),
            ledger: Arc::new(ledger),
            metrics: crate::csi::metrics::Metrics::new().unwrap_or_else(|e| panic!("{e}")),
            endpoint: None,
        };
        let r = replica("n", None, None);
        let generation = generation_digest(&r.spec.wrapper_spec());
        let progress = shared.catalog.progress("ns", "m", &generation);
        progress.plan(20, Some(3000));
        let config = progress.file("llm", "llm/config.json", Some(1000));
        config.advance(1000);
        let shards: Vec<_> = (1..=18)
            .map(|i| progress.file("llm", &format!("llm/model-{i:05}.safetensors"), Some(100)))
            .collect();
        shards[0].advance(40);
        let s = replica_status(&r, &shared, &VolumeRoot::new(state.path()));
        assert_eq!(s.phase, ReplicaPhase::Filling);
        assert_eq!((s.files_done, s.files_total), (1, 20));
        assert_eq!((s.bytes_done, s.bytes_total), (1040, 3000));
        assert_eq!(
            s.filling.len(),
            MAX_FILES_IN_STATUS,
            "in-flight files are listed up to the cap"
        );
        assert_eq!(
            s.filling[0],
            zerocopy_api::replica::FileProgress {
                file: "llm/model-00001.safetensors".into(),
                bytes_done: 40,
                bytes_total: Some(100)
            }
        );
        assert!(
            s.message
                .as_deref()
                .unwrap_or_default()
                .starts_with("filling 1.0 KiB/2.9 KiB, 1/20 files done (llm/model-00001.safetensors"),
            "{:?}",
            s.message
        );
    }

    #[test]
    fn peers_are_ready_nodes_with_endpoints_and_earlier_nodes_still_filling() {
        let replicas = vec![
            replica("a", Some(ReplicaPhase::Filling), Some("http://a")),
            replica("b", Some(ReplicaPhase::Failed), Some("http://b")),
            replica("c", None, None),
            replica("d", Some(ReplicaPhase::Ready), Some("http://d")),
            replica("e", Some(ReplicaPhase::Ready), None),
            replica("z", Some(ReplicaPhase::Pending), Some("http://z")),
        ];
        assert!(
            peer_view("m-node", "ns", "m", "g1", &replicas).catching_up,
            "its own replica is not listed yet"
        );
        let mut replicas = replicas;
        replicas.push(replica("m-node", None, None));
        let v = peer_view("m-node", "ns", "m", "g1", &replicas);
        assert!(!v.catching_up);
        assert_eq!(v.ready, vec![("d".to_string(), "http://d".to_string())]);
        // b failed (it will not deliver), z comes after this node, d and e
        // are Ready (e cannot be read without an endpoint, but is not waited for).
        assert_eq!(v.earlier_fillers, vec!["a".to_string(), "c".to_string()]);
        assert!(
            peer_view("a", "ns", "m", "g1", &replicas).earlier_fillers.is_empty(),
            "the first node fetches from the origin"
        );
        for (ns, generation) in [("ns", "g2"), ("other", "g1")] {
            let v = peer_view("m-node", ns, "m", generation, &replicas);
            assert!(
                v.ready.is_empty() && v.earlier_fillers.is_empty(),
                "{ns}/{generation}: {v:?}"
            );
        }
    }
}
