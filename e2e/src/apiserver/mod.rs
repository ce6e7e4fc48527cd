//! An in-process Kubernetes API server over real HTTP on 127.0.0.1.
//!
//! - [`store`]: objects, resourceVersions, watch history, write semantics.
//! - [`http`]: discovery, REST verbs, watch streams, Tables.
//! - [`apply`], [`patch`], [`schema`], [`selector`], [`table`]: the pieces a
//!   real server has, as far as the project's clients use them.
//! - [`gc`]: ownerReference garbage collection and deletion propagation.
//! - [`faults`]: injected 429s, 500s, timeouts and cut watches.
//! - [`auth`], [`rbac`], [`admission`]: bearer-token authentication, RBAC
//!   authorization and ValidatingAdmissionPolicies (CEL).

pub mod admission;
pub mod apply;
pub mod auth;
pub mod error;
pub mod events;
pub mod faults;
pub mod gc;
pub mod http;
pub mod patch;
pub mod rbac;
pub mod schema;
pub mod selector;
pub mod store;
pub mod table;
pub mod types;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

pub use auth::{Authenticator, UserInfo};
pub use error::ApiError;
pub use faults::{FaultConfig, FaultKind, Faults};
pub use store::Store;

/// Requests counted per client (User-Agent) and per second, for benchmarks.
#[derive(Clone, Default)]
pub struct RequestStats(Arc<Mutex<StatsInner>>);

#[derive(Default)]
struct StatsInner {
    start: Option<Instant>,
    per_agent: BTreeMap<String, AgentStats>,
}

#[derive(Clone, Debug, Default)]
pub struct AgentStats {
    pub total: u64,
    pub watches: u64,
    pub writes: u64,
    /// Requests in each second since the server started.
    pub per_second: BTreeMap<u64, u64>,
}

impl AgentStats {
    pub fn peak_qps(&self) -> u64 {
        self.per_second.values().copied().max().unwrap_or(0)
    }
}

impl RequestStats {
    fn record(&self, agent: &str, method: &str, is_watch: bool) {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let start = *s.start.get_or_insert_with(Instant::now);
        let second = start.elapsed().as_secs();
        let a = s.per_agent.entry(agent.to_string()).or_default();
        a.total += 1;
        if is_watch {
            a.watches += 1;
        }
        if method != "GET" {
            a.writes += 1;
        }
        *a.per_second.entry(second).or_default() += 1;
    }

    /// Statistics of clients whose User-Agent starts with `prefix`, merged.
    pub fn for_agent(&self, prefix: &str) -> AgentStats {
        let s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = AgentStats::default();
        for (_, a) in s.per_agent.iter().filter(|(k, _)| k.starts_with(prefix)) {
            out.total += a.total;
            out.watches += a.watches;
            out.writes += a.writes;
            for (sec, n) in &a.per_second {
                *out.per_second.entry(*sec).or_default() += n;
            }
        }
        out
    }
}

#[derive(Clone, Debug)]
pub struct ApiServerOptions {
    /// Watch events kept for resuming; older versions answer 410 Gone.
    pub history: usize,
    pub bookmark_interval: Duration,
    /// 0 picks a free port.
    pub port: u16,
}

impl Default for ApiServerOptions {
    fn default() -> Self {
        ApiServerOptions {
            history: 10_000,
            bookmark_interval: Duration::from_secs(5),
            port: 0,
        }
    }
}

/// A running API server; stops when dropped.
pub struct ApiServer {
    pub addr: SocketAddr,
    pub store: Store,
    pub faults: Faults,
    pub stats: RequestStats,
    /// Where each node's kubelet writes container logs (for `kubectl logs`).
    pub logs: PodLogs,
    /// Tokens and their users; mint more with [`ApiServer::token`].
    pub auth: Authenticator,
    /// The token of the kubeconfig [`ApiServer::write_kubeconfig`] writes (`system:masters`).
    admin_token: String,
    shutdown: watch::Sender<bool>,
}

/// Node name → the directory its kubelet writes `<ns>_<pod>/<container>.log` into.
#[derive(Clone, Default)]
pub struct PodLogs(Arc<Mutex<BTreeMap<String, PathBuf>>>);

impl PodLogs {
    pub fn register(&self, node: &str, dir: PathBuf) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(node.to_string(), dir);
    }

    pub fn path(&self, node: &str, namespace: &str, pod: &str, container: &str) -> Option<PathBuf> {
        let dirs = self.0.lock().unwrap_or_else(|e| e.into_inner());
        Some(log_file(dirs.get(node)?, namespace, pod, container))
    }
}

/// The one layout of container logs below a node's log directory.
pub fn log_file(dir: &Path, namespace: &str, pod: &str, container: &str) -> PathBuf {
    dir.join(format!("{namespace}_{pod}")).join(format!("{container}.log"))
}

impl ApiServer {
    pub async fn start(opts: ApiServerOptions) -> std::io::Result<Self> {
        let store = Store::new(opts.history);
        let faults = Faults::default();
        let stats = RequestStats::default();
        let logs = PodLogs::default();
        let auth = Authenticator::default();
        let admin_token = auth.mint(UserInfo::admin());
        let state = Arc::new(http::ServerState {
            store: store.clone(),
            faults: faults.clone(),
            stats: stats.clone(),
            bookmark_interval: opts.bookmark_interval,
            logs: logs.clone(),
            auth: auth.clone(),
        });
        let app = axum::Router::new()
            .fallback(http::handle)
            .layer(axum::middleware::from_fn_with_state(faults.clone(), faults::inject))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", opts.port)).await?;
        let addr = listener.local_addr()?;
        let (shutdown, rx) = watch::channel(false);
        let mut server_rx = rx.clone();
        tokio::spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
                let _ = server_rx.changed().await;
            });
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "simulated API server stopped");
            }
        });
        tokio::spawn(gc::run(store.clone(), rx));
        Ok(ApiServer {
            addr,
            store,
            faults,
            stats,
            logs,
            auth,
            admin_token,
            shutdown,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes the admin kubeconfig (a `system:masters` token; plain HTTP).
    pub fn write_kubeconfig(&self, path: &Path) -> std::io::Result<PathBuf> {
        self.write_kubeconfig_with_token(path, &self.admin_token)
    }

    /// Writes a kubeconfig that authenticates with `token`.
    pub fn write_kubeconfig_with_token(&self, path: &Path, token: &str) -> std::io::Result<PathBuf> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(path, self.kubeconfig_text(token))?;
        Ok(path.to_path_buf())
    }

    fn kubeconfig_text(&self, token: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: zerocopy-sim\n  cluster:\n    server: {}\n\
             contexts:\n- name: zerocopy-sim\n  context:\n    cluster: zerocopy-sim\n    user: zerocopy-sim\n    namespace: default\n\
             current-context: zerocopy-sim\nusers:\n- name: zerocopy-sim\n  user:\n    token: {token}\n",
            self.url()
        )
    }

    /// A new token for `user`.
    pub fn token(&self, user: UserInfo) -> String {
        self.auth.mint(user)
    }

    /// A kubeconfig for the service account `namespace/name`, its token bound to
    /// `node` (the `authentication.kubernetes.io/node-name` extra) when given.
    pub fn service_account_kubeconfig(
        &self,
        path: &Path,
        namespace: &str,
        name: &str,
        node: Option<&str>,
    ) -> std::io::Result<PathBuf> {
        let token = self.token(UserInfo::service_account(namespace, name, node));
        self.write_kubeconfig_with_token(path, &token)
    }

    /// A kubeconfig for a plain user in `groups` (and `system:authenticated`).
    pub fn user_kubeconfig(&self, path: &Path, username: &str, groups: &[&str]) -> std::io::Result<PathBuf> {
        let token = self.token(UserInfo::user(username, groups));
        self.write_kubeconfig_with_token(path, &token)
    }

    pub fn stop(&self) {
        let _ = self.shutdown.send(true);
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

impl ApiServer {
    /// An admin `kube::Client` for this server, configured as a kubeconfig user's would be.
    pub async fn client(&self) -> Result<kube::Client, kube::Error> {
        self.client_with_token(&self.admin_token).await
    }

    /// A `kube::Client` that authenticates with `token`.
    pub async fn client_with_token(&self, token: &str) -> Result<kube::Client, kube::Error> {
        let kubeconfig = kube::config::Kubeconfig::from_yaml(&self.kubeconfig_text(token))
            .map_err(|e| kube::Error::Service(e.to_string().into()))?;
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .map_err(|e| kube::Error::Service(e.to_string().into()))?;
        kube::Client::try_from(config)
    }

    /// A `kube::Client` for `user`, with a fresh token.
    pub async fn client_for(&self, user: UserInfo) -> Result<kube::Client, kube::Error> {
        let token = self.token(user);
        self.client_with_token(&token).await
    }
}
