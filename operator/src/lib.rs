//! The zerocopy operator. Pure decisions live in [`placement`], [`status`]
//! and [`task`]; the controllers ([`wrapper_controller`], [`task_controller`])
//! read from caches and write by server-side apply; [`run`] wires them up
//! behind leader election.

pub mod context;
pub mod crds;
pub mod leader;
pub mod lenient;
pub mod metrics;
pub mod placement;
pub mod status;
pub mod task;
pub mod task_controller;
pub mod wrapper_controller;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use futures_util::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use kube::runtime::controller::Controller;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{watcher, WatchStreamExt};
use kube::ResourceExt;
use zerocopy_api::{ModelReplica, ModelTask, ModelWrapper};

use context::{Context, Options};
use metrics::Metrics;

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub agent_namespace: String,
    pub identity: String,
    /// Leader election: (namespace, lease name); None runs without it.
    pub leader: Option<(String, String)>,
    pub metrics_addr: Option<SocketAddr>,
    /// How long a NotReady node or one whose agent Lease lapsed keeps its replicas.
    pub node_grace: Duration,
}

/// A change in what placement sees on a node: labels, readiness, cordon.
fn hash_of(s: &str) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.hash(&mut h);
    Some(h.finish())
}

fn node_signature(n: &Node) -> Option<u64> {
    let ready = n
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready").map(|c| c.status.clone()));
    hash_of(&format!(
        "{:?}|{:?}|{:?}",
        n.labels(),
        ready,
        n.spec.as_ref().and_then(|s| s.unschedulable)
    ))
}

/// A change in an agent's presence or capacity (renewals alone are not).
fn lease_signature(l: &Lease) -> Option<u64> {
    hash_of(&format!(
        "{:?}|{:?}|{:?}|{:?}",
        l.spec.as_ref().and_then(|s| s.holder_identity.clone()),
        l.annotations().get(zerocopy_api::labels::LEASE_CAPACITY),
        l.annotations().get(zerocopy_api::labels::LEASE_USED),
        l.annotations().get(zerocopy_api::labels::LEASE_CONSUMERS)
    ))
}

/// Runs the operator until `shutdown` resolves or leadership is lost.
pub async fn run(
    client: kube::Client,
    opts: RunOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> anyhow::Result<()> {
    let metrics = Metrics::new()?;
    if let Some(addr) = opts.metrics_addr {
        let m = metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = metrics::serve(addr, m).await {
                tracing::error!(%addr, error = %e, "metrics server stopped");
            }
        });
    }

    let (leading_tx, mut leading_rx) = tokio::sync::watch::channel(opts.leader.is_none());
    if let Some((ns, lease)) = &opts.leader {
        let cfg = leader::LeaderConfig::with_defaults(ns.clone(), lease.clone(), opts.identity.clone());
        tokio::spawn(leader::run(client.clone(), cfg, leading_tx));
        metrics.ready.store(true, Ordering::SeqCst);
        tracing::info!(identity = %opts.identity, "waiting to become leader");
        if leading_rx.wait_for(|l| *l).await.is_err() {
            anyhow::bail!("leader election stopped");
        }
    }
    metrics.leader.set(1);

    // Caches of what the controllers read.
    let (nodes, nodes_w) = reflector::store::<Node>();
    let (leases, leases_w) = reflector::store::<Lease>();
    let (replicas, replicas_w) = reflector::store::<ModelReplica>();
    let (trigger_tx, trigger_rx) = tokio::sync::mpsc::channel::<()>(16);

    let node_stream = reflector::reflector(
        nodes_w,
        watcher(Api::<Node>::all(client.clone()), watcher::Config::default()),
    )
    .default_backoff()
    .applied_objects()
    .predicate_filter(node_signature, Default::default());
    let lease_api: Api<Lease> = Api::namespaced(client.clone(), &opts.agent_namespace);
    let lease_stream = reflector::reflector(
        leases_w,
        watcher(lease_api, watcher::Config::default()).modify(|o| o.managed_fields_mut().clear()),
    )
    .default_backoff()
    .applied_objects()
    .predicate_filter(lease_signature, Default::default());
    let replica_stream = reflector::reflector(
        replicas_w,
        watcher(Api::<ModelReplica>::all(client.clone()), watcher::Config::default())
            .modify(|o| o.managed_fields_mut().clear()),
    )
    .default_backoff()
    .touched_objects();
    // Replica changes reach their wrapper through `owns`; this stream only fills the cache.
    tokio::spawn(async move {
        let mut stream = replica_stream.boxed();
        while stream.next().await.is_some() {}
    });
    for stream in [node_stream.map(|_| ()).boxed(), lease_stream.map(|_| ()).boxed()] {
        let tx = trigger_tx.clone();
        tokio::spawn(async move {
            let mut stream = stream;
            while stream.next().await.is_some() {
                // A full channel already holds a pending "reconcile all".
                let _ = tx.try_send(());
            }
        });
    }
    let (n, l, r) = (nodes.clone(), leases.clone(), replicas.clone());
    let (a, b, c) = tokio::join!(n.wait_until_ready(), l.wait_until_ready(), r.wait_until_ready());
    a.and(b).and(c).context("a cache stopped before it synced")?;

    // Lenient: one malformed ModelWrapper cannot break the watch of the others.
    let wrapper_api: Api<lenient::Lenient<ModelWrapper>> = Api::all(client.clone());
    let wrapper_ctl = Controller::new(wrapper_api.clone(), watcher::Config::default().any_semantic());
    let ctx = Context::new(
        client.clone(),
        Options {
            agent_namespace: opts.agent_namespace.clone(),
            identity: opts.identity.clone(),
            node_grace: opts.node_grace,
        },
        nodes,
        leases,
        replicas,
        wrapper_ctl.store(),
        metrics.clone(),
    );
    metrics.ready.store(true, Ordering::SeqCst);

    // Debounce node/lease bursts into one "reconcile every wrapper".
    let all_trigger = futures_util::stream::unfold(trigger_rx, |mut rx| async move {
        rx.recv().await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        while rx.try_recv().is_ok() {}
        Some(((), rx))
    });

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // One stop signal for both controllers.
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    tokio::spawn(async move {
        tokio::select! {
            _ = shutdown => tracing::info!("shutting down"),
            _ = leading_rx.wait_for(|l| !*l) => tracing::error!("leadership lost; stopping so that only the leader writes"),
        }
        let _ = stop_tx.send(true);
    });

    let wrapper_store = wrapper_ctl.store();
    let wrappers_done = wrapper_ctl
        .owns(Api::<ModelReplica>::all(client.clone()), watcher::Config::default())
        .reconcile_all_on(all_trigger)
        .graceful_shutdown_on(stopped(stop_rx.clone()))
        .run(
            wrapper_controller::reconcile,
            wrapper_controller::error_policy,
            ctx.clone(),
        )
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "wrapper controller");
            }
        });

    let task_ctl = Controller::new(Api::<ModelTask>::all(client.clone()), watcher::Config::default());
    let task_store = task_ctl.store();
    let tasks_done = task_ctl
        .owns(Api::<Job>::all(client.clone()), watcher::Config::default())
        .watches(
            Api::<ModelWrapper>::all(client.clone()),
            watcher::Config::default(),
            move |w| {
                let ns = w.namespace().unwrap_or_default();
                task_store
                    .state()
                    .into_iter()
                    .filter(|t| t.namespace().as_deref() == Some(ns.as_str()) && t.spec.wrapper == w.name_any())
                    .map(|t| ObjectRef::from_obj(t.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .graceful_shutdown_on(stopped(stop_rx.clone()))
        .run(task_controller::reconcile, task_controller::error_policy, ctx.clone())
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "task controller");
            }
        });
    // Ready labels of deleted wrappers (no finalizer: see LEGACY_FINALIZER).
    let sweeper = tokio::spawn({
        let ctx = ctx.clone();
        let mut stop = stop_rx.clone();
        async move {
            loop {
                match wrapper_controller::sweep_labels(&ctx).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(labels = n, "removed ready labels of deleted ModelWrappers"),
                    Err(e) => tracing::warn!(error = %e, "sweeping ready labels"),
                }
                tokio::select! {
                    _ = tokio::time::sleep(wrapper_controller::RESYNC) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        }
    });
    let gauge = tokio::spawn(async move {
        loop {
            let mut counts = std::collections::BTreeMap::<String, i64>::new();
            for w in wrapper_store.state() {
                let phase = w
                    .get()
                    .and_then(|w| w.status.as_ref())
                    .and_then(|s| s.phase.clone())
                    .unwrap_or_else(|| "Unknown".into());
                *counts.entry(phase).or_default() += 1;
            }
            metrics.wrappers.reset();
            for (phase, n) in counts {
                metrics.wrappers.with_label_values(&[&phase]).set(n);
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    });
    tokio::join!(wrappers_done, tasks_done);
    gauge.abort();
    sweeper.abort();
    Ok(())
}
