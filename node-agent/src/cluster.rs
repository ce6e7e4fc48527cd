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
use zerocopy_api::labels::{AGENT_MANAGER, LEASE_CAPACITY, LEASE_USED, NODE_LABEL};
use zerocopy_api::{ModelReplica, ModelReplicaStatus, ModelWrapper, ReplicaPhase};

use crate::csi::catalog::{describe_progress, FillState};
use crate::fill::FillEngine;
use crate::layout::VolumeRoot;
use crate::manifests::LoadedWrapper;
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
}

/// Why `run` stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Serving CSI / filling.
    #[error(transparent)]
    Serve(#[from] crate::serve::ServeError),
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
    Some(LoadedWrapper {
        file: PathBuf::from(format!("modelreplica/{ns}/{}", replica.name_any())),
        namespace: ns,
        name: replica.spec.wrapper.clone(),
        wrapper,
    })
}

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
        ..Default::default()
    };
    match shared.catalog.state(&ns, name, &generation) {
        FillState::Pending => s.phase = ReplicaPhase::Pending,
        FillState::Filling(files) => {
            s.phase = ReplicaPhase::Filling;
            s.bytes_done = files.iter().map(|(_, done, _)| done).sum();
            s.bytes_total = files.iter().filter_map(|(_, _, total)| *total).sum();
            s.message = Some(describe_progress(&files));
        }
        FillState::Ready => {
            s.phase = ReplicaPhase::Ready;
            let total = root.read_manifest(&ns, name, &generation).map_or(0, |m| m.total_bytes);
            s.bytes_total = total;
            s.bytes_done = total;
            s.digest = Some(generation);
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

async fn renew_lease(client: kube::Client, opts: RunOptions, root: VolumeRoot) {
    let api: Api<Lease> = Api::namespaced(client, &opts.lease_namespace);
    loop {
        let used = root.used_bytes().unwrap_or(0);
        let mut annotations = BTreeMap::from([(LEASE_USED.to_string(), used.to_string())]);
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
        }
        tokio::time::sleep(opts.renew_every).await;
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
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let root = engine.root().clone();
    tokio::spawn(renew_lease(client.clone(), opts.clone(), root.clone()));

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
                                a.namespace != b.namespace || a.name != b.name || a.wrapper.spec != b.wrapper.spec
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
            tokio::spawn(write_statuses(status_client, store, shared, status_root, status_every));
        },
        shutdown,
    )
    .await?;
    Ok(())
}
