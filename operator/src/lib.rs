//! The zerocopy operator. Pure decisions live in [`placement`], [`status`]
//! and [`task`]; the controllers ([`wrapper_controller`], [`task_controller`])
//! read from caches and write by server-side apply; [`run`] wires them up
//! behind leader election.

pub mod context;
pub mod crds;
pub mod index;
pub mod leader;
pub mod lenient;
pub mod metrics;
pub mod placement;
pub mod ready;
pub mod status;
pub mod task;
pub mod task_controller;
pub mod wrapper_controller;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::Api;
use kube::runtime::controller::Controller;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{watcher, WatchStreamExt};
use kube::ResourceExt;
use zerocopy_api::{ModelReplica, ModelTask, ModelWrapper};

use context::{Context, Options};
use lenient::Lenient;
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

/// Wrapper reconciles running at once.
const WRAPPER_CONCURRENCY: u16 = 16;

/// A change in an agent's presence or capacity (renewals alone are not).
fn lease_signature(l: &Lease) -> String {
    format!(
        "{:?}|{:?}|{:?}|{:?}",
        l.spec.as_ref().and_then(|s| s.holder_identity.clone()),
        l.annotations().get(zerocopy_api::labels::LEASE_CAPACITY),
        l.annotations().get(zerocopy_api::labels::LEASE_USED),
        l.annotations().get(zerocopy_api::labels::LEASE_CONSUMERS)
    )
}

/// Turns node and agent-Lease events into reconciles of the wrappers whose
/// placement they can move (see [`index`]): a ready-label write, a status
/// heartbeat or a Lease renewal wakes none. Lease expiry is silent; each
/// wrapper re-checks every [`wrapper_controller::RESYNC`].
async fn route_node_changes(
    nodes: futures_util::stream::BoxStream<'static, Result<watcher::Event<Node>, watcher::Error>>,
    leases: futures_util::stream::BoxStream<'static, Result<watcher::Event<Lease>, watcher::Error>>,
    ctx: Arc<Context>,
    tx: tokio::sync::mpsc::UnboundedSender<ObjectRef<Lenient<ModelWrapper>>>,
) {
    enum Ev {
        Node(Box<watcher::Event<Node>>),
        Lease(Box<watcher::Event<Lease>>),
    }
    let mut events = futures_util::stream::select(
        nodes
            .filter_map(|e| async move { e.ok().map(|e| Ev::Node(Box::new(e))) })
            .boxed(),
        leases
            .filter_map(|e| async move { e.ok().map(|e| Ev::Lease(Box::new(e))) })
            .boxed(),
    );
    let mut views = index::NodeViews::default();
    let mut agents: HashMap<String, String> = HashMap::new();
    let mut primed = false;
    while let Some(ev) = events.next().await {
        // Selectors of the wrappers, from the cache (malformed ones have none to match).
        let selectors = || -> Vec<(index::WrapperKey, std::collections::BTreeMap<String, String>)> {
            ctx.caches
                .wrappers
                .state()
                .iter()
                .filter_map(|w| {
                    let spec = &w.get()?.spec;
                    Some(((w.namespace()?, w.name_any()), spec.node_selector.clone()))
                })
                .collect()
        };
        let wake: Vec<index::WrapperKey> = match ev {
            Ev::Node(ev) => {
                let changes = views.apply(&ev);
                if changes.is_empty() {
                    continue;
                }
                let sel = selectors();
                changes
                    .iter()
                    .flat_map(|c| {
                        let holding = ctx.caches.replica_index.wrappers_on(&c.0);
                        index::affected_by_node(c, sel.iter().map(|(k, s)| (k, s)), &holding)
                    })
                    .collect()
            }
            Ev::Lease(ev) => {
                let changed: Vec<String> = match &*ev {
                    watcher::Event::Apply(l) | watcher::Event::InitApply(l) => {
                        let sig = lease_signature(l);
                        let before = agents.insert(l.name_any(), sig.clone());
                        if primed && before.as_ref() != Some(&sig) {
                            vec![l.name_any()]
                        } else {
                            vec![]
                        }
                    }
                    watcher::Event::Delete(l) => {
                        agents.remove(&l.name_any()).map(|_| l.name_any()).into_iter().collect()
                    }
                    watcher::Event::Init => vec![],
                    watcher::Event::InitDone => {
                        primed = true;
                        vec![]
                    }
                };
                if changed.is_empty() {
                    continue;
                }
                let sel = selectors();
                changed
                    .iter()
                    .flat_map(|node| {
                        let holding = ctx.caches.replica_index.wrappers_on(node);
                        index::affected_by_agent(views.get(node), sel.iter().map(|(k, s)| (k, s)), &holding)
                    })
                    .collect()
            }
        };
        for (ns, name) in wake {
            if tx.send(ObjectRef::new(&name).within(&ns)).is_err() {
                return;
            }
        }
    }
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
    let (jobs, jobs_w) = reflector::store::<Job>();
    let (pods, pods_w) = reflector::store::<Pod>();
    let replica_index = Arc::new(index::ReplicaIndex::default());
    // Wrappers a node or agent change can move (see `index`), for the wrapper controller.
    let (moved_tx, moved_rx) = tokio::sync::mpsc::unbounded_channel::<ObjectRef<Lenient<ModelWrapper>>>();

    let node_stream = reflector::reflector(
        nodes_w,
        watcher(Api::<Node>::all(client.clone()), watcher::Config::default())
            .modify(|o| o.managed_fields_mut().clear()),
    )
    .default_backoff()
    .boxed();
    let lease_api: Api<Lease> = Api::namespaced(client.clone(), &opts.agent_namespace);
    let lease_stream = reflector::reflector(
        leases_w,
        watcher(lease_api, watcher::Config::default()).modify(|o| o.managed_fields_mut().clear()),
    )
    .default_backoff()
    .boxed();
    let idx = replica_index.clone();
    // The index is updated before the store, so once the store is ready the
    // index is complete (a reconcile waits for the store).
    let replica_stream = reflector::reflector(
        replicas_w,
        watcher(Api::<ModelReplica>::all(client.clone()), watcher::Config::default())
            .modify(|o| o.managed_fields_mut().clear())
            .map_ok(move |ev| {
                idx.apply(&ev);
                ev
            }),
    )
    .default_backoff()
    .touched_objects();
    // Only the tasks' Jobs and pods: the label the operator puts on both.
    let task_objects = watcher::Config::default().labels(task::TASK_LABEL);
    let job_stream = reflector::reflector(
        jobs_w,
        watcher(Api::<Job>::all(client.clone()), task_objects.clone()).modify(|o| o.managed_fields_mut().clear()),
    )
    .default_backoff()
    .touched_objects();
    // The task controller's own cache of the wrappers, filled by the stream
    // that wakes it: a task woken by its wrapper reads that same version (the
    // wrapper controller's cache may not have it yet).
    let (task_wrappers, task_wrappers_w) = reflector::store::<Lenient<ModelWrapper>>();
    let task_wrapper_stream = reflector::reflector(
        task_wrappers_w,
        watcher(
            Api::<Lenient<ModelWrapper>>::all(client.clone()),
            watcher::Config::default(),
        )
        .modify(|o| o.managed_fields_mut().clear()),
    )
    .default_backoff()
    .touched_objects();
    let pod_stream = reflector::reflector(
        pods_w,
        watcher(Api::<Pod>::all(client.clone()), task_objects).modify(|o| o.managed_fields_mut().clear()),
    )
    .default_backoff()
    .touched_objects();

    // Lenient: one malformed ModelWrapper cannot break the watch of the others.
    let wrapper_api: Api<Lenient<ModelWrapper>> = Api::all(client.clone());
    // At most WRAPPER_CONCURRENCY reconciles at once: each holds a snapshot of
    // every node and an HTTP connection, and more in flight does not write
    // faster on a couple of cores.
    let wrapper_ctl = Controller::new(wrapper_api.clone(), watcher::Config::default().any_semantic())
        .with_config(kube::runtime::controller::Config::default().concurrency(WRAPPER_CONCURRENCY));
    let wrapper_store = wrapper_ctl.store();
    let ctx = Context::new(
        client.clone(),
        Options {
            agent_namespace: opts.agent_namespace.clone(),
            identity: opts.identity.clone(),
            node_grace: opts.node_grace,
        },
        context::Caches {
            nodes: nodes.clone(),
            leases: leases.clone(),
            replicas: replicas.clone(),
            replica_index: replica_index.clone(),
            wrappers: wrapper_store.clone(),
            jobs: jobs.clone(),
            pods: pods.clone(),
            task_wrappers: task_wrappers.clone(),
            replicas_ready: ready::Ready::new({
                let replicas = replicas.clone();
                async move { replicas.wait_until_ready().await.is_ok() }
            }),
            task_caches_ready: ready::Ready::new({
                let (jobs, pods, wrappers) = (jobs.clone(), pods.clone(), task_wrappers);
                async move {
                    let (a, b, c) = tokio::join!(
                        jobs.wait_until_ready(),
                        pods.wait_until_ready(),
                        wrappers.wait_until_ready()
                    );
                    a.is_ok() && b.is_ok() && c.is_ok()
                }
            }),
        },
        metrics.clone(),
    );
    tokio::spawn(route_node_changes(node_stream, lease_stream, ctx.clone(), moved_tx));

    let (n, l) = (nodes.clone(), leases.clone());
    let (a, b) = tokio::join!(n.wait_until_ready(), l.wait_until_ready());
    a.and(b).context("a cache stopped before it synced")?;
    metrics.ready.store(true, Ordering::SeqCst);
    let moved = futures_util::stream::unfold(moved_rx, |mut rx| async move { Some((rx.recv().await?, rx)) });

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

    let wrappers_done = wrapper_ctl
        .owns_stream(replica_stream)
        .reconcile_on(moved)
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
        .owns_stream(job_stream)
        .watches_stream(pod_stream, |p: Pod| {
            let task = p.labels().get(task::TASK_LABEL)?;
            Some(ObjectRef::new(task).within(&p.namespace()?))
        })
        .watches_stream(task_wrapper_stream, move |w: Lenient<ModelWrapper>| {
            let ns = w.namespace().unwrap_or_default();
            task_store
                .state()
                .into_iter()
                .filter(|t| t.namespace().as_deref() == Some(ns.as_str()) && t.spec.wrapper == w.name_any())
                .map(|t| ObjectRef::from_obj(t.as_ref()))
                .collect::<Vec<_>>()
        })
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
