//! `zerocopy-operator`: a thin binary over the library.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Json,
    Text,
}

/// Places ModelWrappers on nodes, aggregates their status, labels ready nodes
/// and runs ModelTasks as Jobs.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    /// A kubeconfig file; default: in-cluster config, then $KUBECONFIG / ~/.kube/config.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Namespace of the node agents' Leases.
    #[arg(long, env = "ZEROCOPY_AGENT_NAMESPACE", default_value = "zerocopy-system")]
    agent_namespace: String,
    /// Namespace of the leader-election Lease (the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "zerocopy-system")]
    namespace: String,
    /// Elect a leader among replicas (turn off only with a single replica).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// This replica's identity in the leader Lease and in Events.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Serve /metrics, /healthz and /readyz here.
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    #[arg(long, value_enum, default_value_t = LogFormat::Json)]
    log_format: LogFormat,
    /// Seconds a node that is NotReady, or whose agent's Lease lapsed, keeps
    /// its replicas (an agent upgrade or a kubelet blip must not wipe it).
    #[arg(long, default_value_t = 300)]
    node_grace_seconds: u64,
}

async fn client(kubeconfig: Option<&PathBuf>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc =
                kube::config::Kubeconfig::read_from(path).with_context(|| format!("reading {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?
        }
        None => kube::Config::infer().await?,
    };
    Ok(kube::Client::try_from(config)?)
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,kube=warn".into());
    match cli.log_format {
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init(),
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init(),
    }
    let identity = cli.identity.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "zerocopy-operator".into())
    });
    let client = client(cli.kubeconfig.as_ref()).await?;
    let opts = zerocopy_operator::RunOptions {
        agent_namespace: cli.agent_namespace,
        identity,
        leader: cli
            .leader_elect
            .then(|| (cli.namespace.clone(), "zerocopy-operator".to_string())),
        metrics_addr: Some(cli.metrics_addr),
        node_grace: std::time::Duration::from_secs(cli.node_grace_seconds),
    };
    zerocopy_operator::run(client, opts, shutdown_signal()).await
}
