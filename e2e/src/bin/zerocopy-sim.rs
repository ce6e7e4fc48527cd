//! `zerocopy-sim`: runs a simulated cluster until interrupted, so kubectl,
//! the operator or a test can be pointed at it.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use zerocopy_e2e::apiserver::{ApiServerOptions, FaultConfig};
use zerocopy_e2e::{AgentMode, Cluster, ClusterOptions, NodeSpec};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Mode {
    /// Agents serve ModelWrapper YAML from <dir>/nodes/<node>/wrappers.
    Standalone,
    /// Agents run in cluster mode against this API server.
    Cluster,
}

/// A simulated Kubernetes cluster on this machine: API server on 127.0.0.1,
/// scheduler, Job controller, and nodes with simulated kubelets and optionally
/// real zerocopy-node-agent processes.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    /// Where to write the kubeconfig for clients.
    #[arg(long)]
    kubeconfig: PathBuf,
    /// Number of nodes (node-1 .. node-N).
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// A zerocopy-node-agent binary: every node runs one.
    #[arg(long)]
    agent_bin: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = Mode::Standalone)]
    agent_mode: Mode,
    /// Namespace of the agents' Leases in cluster mode (created by the simulator).
    #[arg(long, default_value = "zerocopy-system")]
    agent_namespace: String,
    /// Working directory for node roots, sockets and logs (default: a temporary one).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Port for the API server (default: a free one).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Fraction of requests answered with an injected 429 (Retry-After), 500 or 504 timeout.
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    /// Cut every watch stream at a random time within this many milliseconds.
    #[arg(long)]
    cut_watches_ms: Option<u64>,
    /// Per-node capacity passed to each agent (e.g. 8Gi).
    #[arg(long)]
    capacity: Option<String>,
    /// An extra argument for every agent, repeatable; e.g.
    /// `--agent-arg=--allow-file-dir=/models` lets cluster-mode agents read
    /// file:// sources below /models.
    #[arg(long = "agent-arg", allow_hyphen_values = true)]
    agent_args: Vec<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    // Nodes are added after the agents' namespace exists, so their first
    // Lease write succeeds.
    let mut opts = ClusterOptions::with_nodes(vec![]);
    opts.api = ApiServerOptions {
        port: cli.port,
        ..Default::default()
    };
    opts.dir = cli.dir.clone();
    if let Some(bin) = &cli.agent_bin {
        let mode = match cli.agent_mode {
            Mode::Standalone => AgentMode::Standalone,
            Mode::Cluster => AgentMode::Cluster {
                namespace: cli.agent_namespace.clone(),
            },
        };
        opts = opts.agent(bin, mode);
    }
    opts.agent_args.extend(cli.agent_args.iter().cloned());
    let cluster = Cluster::start(opts).await?;
    if matches!(cli.agent_mode, Mode::Cluster) {
        let t = cluster.store().resource_type("", "namespaces")?;
        cluster.store().create(
            &t,
            "",
            serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": cli.agent_namespace}}),
        )?;
    }
    for i in 1..=cli.nodes {
        let n = NodeSpec::new(&format!("node-{i}"));
        cluster
            .add_node(match &cli.capacity {
                Some(c) => n.capacity(c),
                None => n,
            })
            .await?;
    }
    cluster.api.faults.set(FaultConfig {
        error_rate: cli.error_rate,
        cut_watches_within: cli.cut_watches_ms.map(Duration::from_millis),
        ..Default::default()
    });
    cluster.api.write_kubeconfig(&cli.kubeconfig)?;
    eprintln!(
        "zerocopy-sim: API server {} with {} node(s); kubeconfig {}; working dir {}",
        cluster.api.url(),
        cli.nodes,
        cli.kubeconfig.display(),
        cluster.dir.display()
    );
    eprintln!("  try: kubectl --kubeconfig {} get nodes", cli.kubeconfig.display());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    eprintln!("zerocopy-sim: stopping");
    cluster.shutdown().await;
    Ok(())
}
