//! `standalone --serve`: the same reconcile as a one-shot run, kept running
//! with the CSI server (so a local client can act as kubelet), metrics, and
//! the YAML files re-read when they change.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::csi::catalog::Catalog;
use crate::csi::identity::IdentityService;
use crate::csi::inflight::InFlight;
use crate::csi::ledger::Ledger;
use crate::csi::metrics::{self, Metrics};
use crate::csi::node::NodeService;
use crate::csi::server;
use crate::fill::FillEngine;
use crate::layout::VolumeRoot;
use crate::manifests::{load_for_serve, LoadedWrapper};
use crate::peer::PeerServer;
use crate::supervisor::{FillPolicy, Supervisor};

/// Settings of the long-running mode.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// ModelWrapper files or directories.
    pub files: Vec<PathBuf>,
    /// The CSI socket.
    pub csi_socket: PathBuf,
    /// Where the publication ledger lives (keep it off the tmpfs).
    pub state_dir: PathBuf,
    /// NodeGetInfo's node id.
    pub node_id: String,
    /// Targets must lie inside this directory when set.
    pub kubelet_dir: Option<PathBuf>,
    /// How long a publish waits for a fill.
    pub publish_wait: Duration,
    /// Where `/metrics` is served, if anywhere.
    pub metrics_addr: Option<SocketAddr>,
    /// How often the files are checked for changes.
    pub watch_interval: Duration,
    /// Concurrency, deadlines, retries and pruning of fills.
    pub fill: FillPolicy,
    /// The upload and peer server, if this agent runs one.
    pub peer: Option<PeerOptions>,
}

/// Where uploads and peer reads are served.
#[derive(Debug, Clone)]
pub struct PeerOptions {
    /// Listen address for uploads from pods (`0.0.0.0:9465`; port 0 picks
    /// one); blobs too unless `blob_addr` is set.
    pub addr: SocketAddr,
    /// A separate listener for blob reads by other agents, so a
    /// NetworkPolicy can admit only agents to it.
    pub blob_addr: Option<SocketAddr>,
    /// Host (node address) in the URL told to pods and peers.
    pub advertise_host: String,
    /// The token other agents present to read blobs; `None`: no blob serving.
    pub token: Option<String>,
    /// Largest upload accepted.
    pub max_upload_bytes: u64,
}

/// Why serving could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Root, state dir or socket.
    #[error("{what}: {source}")]
    Io {
        /// What was being prepared.
        what: String,
        /// OS error.
        source: std::io::Error,
    },
    /// Metrics registry.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The gRPC server stopped with an error.
    #[error("CSI server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServeError {
    let what = what.into();
    move |source| ServeError::Io { what, source }
}

/// What the CSI server and fill loop share, for a mode that reports status.
#[derive(Clone)]
pub struct Shared {
    /// Wanted generations and fill states.
    pub catalog: Arc<Catalog>,
    /// Publications (pods mounting generations).
    pub ledger: Arc<Ledger>,
    /// Metrics registry.
    pub metrics: Metrics,
    /// `http://<node>:<port>` other agents read blobs from, if served.
    pub endpoint: Option<String>,
}

/// Runs until `shutdown` resolves, re-reading the files every `watch_interval`.
pub async fn serve(
    engine: Arc<FillEngine>,
    wrappers: Vec<LoadedWrapper>,
    opts: ServeOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let (tx, rx) = tokio::sync::watch::channel(wrappers);
    let (files, interval) = (opts.files.clone(), opts.watch_interval);
    let poller = tokio::spawn(async move {
        // No fingerprint yet: the files may have changed between the load in
        // main and this task's start, so the first look always reloads.
        let mut fingerprint = None;
        loop {
            tokio::time::sleep(interval).await;
            let now = files_fingerprint(&files);
            if fingerprint.as_ref() == Some(&now) {
                continue;
            }
            fingerprint = Some(now);
            match load_for_serve(&files) {
                Ok(w) => {
                    tracing::info!(wrappers = w.len(), "files changed; reconciling");
                    if tx.send(w).is_err() {
                        return;
                    }
                }
                Err(e) => tracing::error!(error = %e, "files changed but cannot be used; keeping the previous state"),
            }
        }
    });
    let result = serve_wanted(engine, opts, rx, |_| {}, shutdown).await;
    poller.abort();
    result
}

/// The long-running core shared by `standalone --serve` and cluster `run`:
/// CSI server, metrics, and a fill + GC pass whenever `wanted` changes.
/// `on_start` gets the shared state (cluster mode reports status from it).
pub async fn serve_wanted(
    engine: Arc<FillEngine>,
    opts: ServeOptions,
    mut wanted: tokio::sync::watch::Receiver<Vec<LoadedWrapper>>,
    on_start: impl FnOnce(Shared),
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let wrappers = wanted.borrow_and_update().clone();
    let root = engine.root().clone();
    let cleaned = root
        .clean_leftovers()
        .map_err(io(format!("cleaning {}", root.path().display())))?;
    match crate::peer::remove_partial_uploads(&root) {
        Ok(0) => {}
        Ok(n) => tracing::info!(partial = n, "removed uploads a previous run left unfinished"),
        Err(e) => tracing::warn!(error = %e, "could not remove unfinished uploads"),
    }
    let (ledger, dropped) =
        Ledger::load(&opts.state_dir).map_err(io(format!("loading ledger in {}", opts.state_dir.display())))?;
    tracing::info!(publications = ledger.all().len(), dropped, cleaned, "ledger recovered");
    let ledger = Arc::new(ledger);
    let catalog = Arc::new(Catalog::default());
    let metrics = Metrics::new()?;
    if let Some(h) = engine.huge_pages() {
        metrics.tmpfs_huge_pages.set(i64::from(h.granted));
    }
    let mut supervisor = Supervisor::new(
        engine.clone(),
        catalog.clone(),
        ledger.clone(),
        metrics.clone(),
        opts.fill.clone(),
    );
    // Complete generations are Ready before the socket answers.
    supervisor.set_wanted(&wrappers);
    let ready = Arc::new(AtomicBool::new(false));
    let (upload_endpoint, endpoint) = match &opts.peer {
        Some(p) => {
            let (uploads, blobs) = start_peer_server(p, &opts.node_id, &root, &catalog).await?;
            (Some(uploads), blobs)
        }
        None => (None, None),
    };
    let node = NodeService {
        node_id: opts.node_id.clone(),
        root: root.clone(),
        catalog: catalog.clone(),
        ledger: ledger.clone(),
        inflight: InFlight::default(),
        kubelet_dir: opts.kubelet_dir.clone(),
        publish_wait: opts.publish_wait,
        metrics: metrics.clone(),
        upload_endpoint,
    };
    let listener = server::bind(&opts.csi_socket)
        .await
        .map_err(io(format!("binding {}", opts.csi_socket.display())))?;
    if let Some(addr) = opts.metrics_addr {
        let (m, r, l, rd) = (metrics.clone(), root.clone(), ledger.clone(), ready.clone());
        tokio::spawn(async move {
            if let Err(e) = metrics::serve(addr, m, r, l, rd).await {
                tracing::error!(%addr, error = %e, "metrics server stopped");
            }
        });
    }
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let socket = opts.csi_socket.clone();
    let identity = IdentityService { ready: ready.clone() };
    let mut csi_stop = stop_rx.clone();
    let grpc = tokio::spawn({
        let node = node.clone();
        async move {
            server::serve(&socket, listener, identity, node, async move {
                let _ = csi_stop.wait_for(|s| *s).await;
            })
            .await
        }
    });
    ready.store(true, Ordering::SeqCst);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });

    on_start(Shared {
        catalog: catalog.clone(),
        ledger: ledger.clone(),
        metrics: metrics.clone(),
        endpoint: endpoint.clone(),
    });
    enum Event {
        Stop,
        Wanted(bool),
        Supervisor,
    }
    loop {
        supervisor.step();
        metrics.refresh(&root, &ledger);
        collect_uploads(&root, &catalog);
        let event = tokio::select! {
            _ = stop_rx.wait_for(|s| *s) => Event::Stop,
            changed = wanted.changed() => Event::Wanted(changed.is_ok()),
            _ = supervisor.wait() => Event::Supervisor,
        };
        match event {
            Event::Stop => break,
            Event::Wanted(false) => {
                // The source of wanted wrappers ended: keep serving what we
                // have until shutdown.
                let _ = stop_rx.wait_for(|s| *s).await;
                break;
            }
            Event::Wanted(true) => {
                let current = wanted.borrow_and_update().clone();
                supervisor.set_wanted(&current);
                // Generations a pod released while they were still wanted are
                // freed by unpublish; re-check the ones no longer wanted.
                for p in ledger.all() {
                    node.collect(&p.namespace, &p.name, &p.generation);
                }
            }
            Event::Supervisor => {}
        }
    }
    tracing::info!("shutting down; mounts stay in place");
    grpc.await
        .map_err(|e| io("CSI server task")(std::io::Error::other(e)))?
        .map_err(ServeError::from)
}

/// Frees uploads whose bytes are in a complete generation now, or that no
/// wanted wrapper declares.
fn collect_uploads(root: &VolumeRoot, catalog: &Catalog) {
    let wanted = catalog.all_wanted();
    let needed = |namespace: &str, sha: &str| {
        wanted.iter().any(|((ns, name), w)| {
            ns == namespace
                && crate::peer::declares_upload(&w.spec, sha)
                && root.read_manifest(ns, name, &w.generation).is_none()
        })
    };
    match crate::peer::collect_uploads(root, &needed) {
        Ok(0) => {}
        Ok(n) => tracing::info!(uploads = n, "freed uploads now held by generations (or wanted by none)"),
        Err(e) => tracing::warn!(error = %e, "could not free uploads"),
    }
}

/// Binds the upload server (and the blob server, on its own address when
/// one is given) and returns their URLs: uploads, and blobs when a peer
/// token lets this agent serve them.
async fn start_peer_server(
    p: &PeerOptions,
    node: &str,
    root: &VolumeRoot,
    catalog: &Arc<Catalog>,
) -> Result<(String, Option<String>), ServeError> {
    let server = Arc::new(PeerServer {
        root: root.clone(),
        catalog: catalog.clone(),
        peer_token: p.token.clone(),
        node: node.to_string(),
        max_upload_bytes: p.max_upload_bytes,
    });
    let host = if p.advertise_host.contains(':') {
        format!("[{}]", p.advertise_host)
    } else {
        p.advertise_host.clone()
    };
    let bind = |addr: SocketAddr| async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(io(format!("binding the peer server on {addr}")))?;
        let port = listener
            .local_addr()
            .map_err(io("reading the peer server's address"))?
            .port();
        Ok::<_, ServeError>((listener, port))
    };
    let spawn = |listener: tokio::net::TcpListener, app: axum::Router| {
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "peer server stopped");
            }
        });
    };
    let (listener, port) = bind(p.addr).await?;
    let uploads = format!("http://{host}:{port}");
    let blobs = match p.blob_addr {
        Some(addr) => {
            let (blob_listener, blob_port) = bind(addr).await?;
            spawn(listener, server.uploads_router());
            spawn(blob_listener, server.blobs_router());
            format!("http://{host}:{blob_port}")
        }
        None => {
            spawn(listener, server.uploads_router().merge(server.blobs_router()));
            uploads.clone()
        }
    };
    let blobs = p.token.is_some().then_some(blobs);
    tracing::info!(%uploads, blobs = ?blobs, "serving uploads and peers");
    Ok((uploads, blobs))
}

fn files_fingerprint(files: &[PathBuf]) -> Vec<(PathBuf, Option<SystemTime>, u64)> {
    let mut out = Vec::new();
    for f in files {
        let entries: Vec<PathBuf> = if f.is_dir() {
            std::fs::read_dir(f)
                .map(|d| d.flatten().map(|e| e.path()).collect())
                .unwrap_or_default()
        } else {
            vec![f.clone()]
        };
        for p in entries {
            let meta = std::fs::metadata(&p).ok();
            out.push((
                p.clone(),
                meta.as_ref().and_then(|m| m.modified().ok()),
                meta.map_or(0, |m| m.len()),
            ));
        }
    }
    out.sort();
    out
}

/// The default node id: the host name.
pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}
