//! `zerocopy-node-agent`: flags, logging, exit codes. The work is in the library.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use zerocopy_api::quantity::parse_size;
use zerocopy_node_agent::root_tmpfs::{self, RootTmpfs, RootTmpfsMode, RootTmpfsOptions};
use zerocopy_node_agent::source::policy::SourcePolicy;
use zerocopy_node_agent::supervisor::FillPolicy;
use zerocopy_node_agent::{manifests, standalone, status, FillEngine, MountMode, VolumeRoot};

/// Exit code when the input files are wrong (nothing was filled).
const EXIT_INVALID: u8 = 2;
/// Exit code when a fill failed (other wrappers may have been filled).
const EXIT_FILL_FAILED: u8 = 1;

#[derive(Parser)]
#[command(
    name = "zerocopy-node-agent",
    version,
    about = "Fills ModelWrapper weights into node shared memory, once per node."
)]
struct Cli {
    /// Volume root: generations live at <root>/<namespace>/<wrapper>/<generation>.
    #[arg(long, global = true, env = "ZEROCOPY_ROOT", default_value = "/dev/shm/zerocopy")]
    root: PathBuf,
    /// Where CSI publications are recorded (keep it on disk, not on the tmpfs).
    #[arg(long, global = true, env = "ZEROCOPY_STATE_DIR", default_value = "/var/lib/zerocopy")]
    state_dir: PathBuf,
    /// The CSI socket (served with --serve).
    #[arg(long, global = true, default_value = "/run/zerocopy/csi.sock")]
    csi_socket: PathBuf,
    /// Node id reported to kubelet (default: the host name).
    #[arg(long, global = true)]
    node_id: Option<String>,
    /// Where `hf://` sources go unless their spec names an endpoint (a
    /// mirror or an on-premises hub speaking the Hugging Face Hub API).
    #[arg(long, global = true, env = "HF_ENDPOINT", default_value = zerocopy_node_agent::source::hf::DEFAULT_ENDPOINT)]
    hf_endpoint: url::Url,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// How fills are scheduled, bounded and retried (`run` and `standalone --serve`).
#[derive(clap::Args, Clone, Debug)]
struct FillFlags {
    /// Fills running at once on this node.
    #[arg(long, default_value_t = 2)]
    max_parallel_fills: usize,
    /// A fill running longer than this many seconds is stopped and retried.
    #[arg(long, default_value_t = 6 * 3600)]
    fill_deadline: u64,
    /// A fill receiving less than this per second over a whole
    /// --fill-throughput-window is stopped as stalled and retried (e.g. 64Ki).
    #[arg(long, default_value = "64Ki")]
    fill_min_throughput: String,
    /// Seconds over which --fill-min-throughput is measured.
    #[arg(long, default_value_t = 120)]
    fill_throughput_window: u64,
    /// Seconds before the first retry of a failed fill; doubles per failure, with jitter.
    #[arg(long, default_value_t = 10.0)]
    retry_base: f64,
    /// Longest wait between retries, in seconds.
    #[arg(long, default_value_t = 900.0)]
    retry_max: f64,
}

impl FillFlags {
    fn policy(&self, prune: bool) -> anyhow::Result<FillPolicy> {
        Ok(FillPolicy {
            max_parallel: self.max_parallel_fills.max(1),
            deadline: std::time::Duration::from_secs(self.fill_deadline.max(1)),
            min_bytes_per_second: parse_size(&self.fill_min_throughput)
                .with_context(|| format!("--fill-min-throughput {}", self.fill_min_throughput))?,
            throughput_window: std::time::Duration::from_secs(self.fill_throughput_window.max(1)),
            retry_base: std::time::Duration::from_secs_f64(self.retry_base.max(0.01)),
            retry_max: std::time::Duration::from_secs_f64(self.retry_max.max(self.retry_base).max(0.01)),
            prune,
        })
    }
}

/// The agent's own root tmpfs (`--root-tmpfs auto`).
#[derive(clap::Args, Clone, Debug)]
struct RootTmpfsFlags {
    /// Its size: bytes with a k/m/g suffix, or a share of RAM (e.g. 50%).
    #[arg(long, default_value = "50%")]
    root_tmpfs_size: String,
    /// Mount it `huge=within_size` (true) or `huge=never` (false).
    #[arg(long, action = clap::ArgAction::Set, default_value_t = true)]
    root_tmpfs_huge_pages: bool,
}

impl RootTmpfsFlags {
    /// Mounts the root tmpfs when `mode` asks for it and says what happened.
    fn apply(&self, root: &std::path::Path, mode: RootTmpfsMode) -> anyhow::Result<()> {
        // tmpfs reads a bare number as bytes: "8" would be an 8-byte root.
        let size = &self.root_tmpfs_size;
        let unit_ok = size.len() > 1
            && size[..size.len() - 1].bytes().all(|b| b.is_ascii_digit())
            && size.ends_with(['k', 'm', 'g', 't', 'K', 'M', 'G', 'T', '%']);
        anyhow::ensure!(
            unit_ok,
            "--root-tmpfs-size {size:?}: give a number with a unit, k/m/g/t (e.g. 9g) or a share of RAM (e.g. 50%)"
        );
        let options = RootTmpfsOptions {
            size: self.root_tmpfs_size.clone(),
            huge_pages: self.root_tmpfs_huge_pages,
        };
        match root_tmpfs::ensure(root, mode, &options)? {
            RootTmpfs::Mounted { options } => {
                tracing::info!(root = %root.display(), %options, "mounted the agent's tmpfs at the volume root")
            }
            RootTmpfs::Existing { fs_type, super_options } => {
                tracing::info!(root = %root.display(), %fs_type, %super_options, "the volume root is a mount already: using it")
            }
            RootTmpfs::Skipped(why) if mode == RootTmpfsMode::Auto => {
                tracing::info!(root = %root.display(), %why, "no tmpfs of the agent's own at the volume root: generations take the page size of the filesystem the root is on")
            }
            RootTmpfs::Skipped(_) => {}
        }
        Ok(())
    }
}

/// The upload and peer server (`run` and `standalone --serve`).
#[derive(clap::Args, Clone, Debug)]
struct PeerFlags {
    /// Serve uploads from `from_model()` pods here and, with
    /// --peer-token-file, Ready generations to other agents (e.g. 0.0.0.0:9465).
    #[arg(long)]
    peer_addr: Option<std::net::SocketAddr>,
    /// Serve blobs to other agents on this address instead (e.g.
    /// 0.0.0.0:9466), so a NetworkPolicy can admit only agents to it while
    /// pods reach --peer-addr for uploads.
    #[arg(long)]
    blob_addr: Option<std::net::SocketAddr>,
    /// Host or IP in the URL pods and peers reach this agent at (the node's
    /// address; the chart passes status.hostIP). Default: --peer-addr's IP,
    /// or the host name when it listens on all addresses.
    #[arg(long, env = "NODE_IP")]
    advertise_host: Option<String>,
    /// File with the token agents present to each other (a Secret mounted
    /// into agents only). Without it this agent neither serves nor reads peers.
    #[arg(long)]
    peer_token_file: Option<PathBuf>,
}

impl PeerFlags {
    fn token(&self) -> anyhow::Result<Option<String>> {
        self.peer_token_file
            .as_ref()
            .map(|path| {
                let token = std::fs::read_to_string(path)
                    .with_context(|| format!("reading --peer-token-file {}", path.display()))?;
                let token = token.trim().to_string();
                anyhow::ensure!(!token.is_empty(), "--peer-token-file {} is empty", path.display());
                Ok(token)
            })
            .transpose()
    }

    fn options(&self, capacity: Option<u64>) -> anyhow::Result<Option<zerocopy_node_agent::serve::PeerOptions>> {
        let Some(addr) = self.peer_addr else {
            anyhow::ensure!(
                self.peer_token_file.is_none() && self.blob_addr.is_none(),
                "--peer-token-file and --blob-addr need --peer-addr (the upload and peer server)"
            );
            return Ok(None);
        };
        let advertise_host = match &self.advertise_host {
            Some(h) => h.clone(),
            None if addr.ip().is_unspecified() => zerocopy_node_agent::serve::hostname(),
            None => addr.ip().to_string(),
        };
        Ok(Some(zerocopy_node_agent::serve::PeerOptions {
            addr,
            blob_addr: self.blob_addr,
            advertise_host,
            token: self.token()?,
            max_upload_bytes: capacity.unwrap_or(u64::MAX),
        }))
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Fill the ModelWrappers in these YAML files into local shared memory, then exit.
    Standalone {
        /// A ModelWrapper YAML file, or a directory of them.
        #[arg(short = 'f', long = "file", required = true)]
        files: Vec<PathBuf>,
        /// Most bytes all generations together may hold (e.g. 8Gi).
        #[arg(long)]
        capacity: Option<String>,
        /// How generations are backed.
        #[arg(long, value_enum, default_value_t = MountMode::Auto)]
        mount_mode: MountMode,
        /// Mount a tmpfs of the agent's own at the root when it is empty
        /// (off by default here: the root usually is /dev/shm's).
        #[arg(long, value_enum, default_value_t = RootTmpfsMode::Off)]
        root_tmpfs: RootTmpfsMode,
        #[command(flatten)]
        root_tmpfs_options: RootTmpfsFlags,
        /// Also remove generations of wrappers that are not in the files.
        #[arg(long)]
        prune: bool,
        /// No progress bars.
        #[arg(long, short)]
        quiet: bool,
        /// Keep running: serve CSI on --csi-socket, metrics, and re-read the files when they change.
        #[arg(long)]
        serve: bool,
        /// With --serve: CSI target paths must lie inside this directory (kubelet's, e.g. /var/lib/kubelet).
        #[arg(long)]
        kubelet_dir: Option<PathBuf>,
        /// With --serve: seconds a publish waits for a fill before answering "still filling".
        #[arg(long, default_value_t = 30.0)]
        publish_wait: f64,
        /// With --serve: serve /metrics, /healthz and /readyz here (e.g. 127.0.0.1:9464).
        #[arg(long)]
        metrics_addr: Option<std::net::SocketAddr>,
        /// With --serve: seconds between checks of the files for changes.
        #[arg(long, default_value_t = 2.0)]
        watch_interval: f64,
        #[command(flatten)]
        fill: FillFlags,
        #[command(flatten)]
        peer: PeerFlags,
    },
    /// In a cluster: fill this node's ModelReplicas, serve CSI, report status, keep a Lease.
    Run {
        /// A kubeconfig file; default: in-cluster config, then $KUBECONFIG / ~/.kube/config.
        #[arg(long, env = "KUBECONFIG")]
        kubeconfig: Option<PathBuf>,
        /// Namespace of the agents' Leases (the agent's own).
        #[arg(long, env = "POD_NAMESPACE", default_value = "zerocopy-system")]
        namespace: String,
        /// Most bytes all generations together may hold (e.g. 8Gi); advertised on the Lease.
        #[arg(long)]
        capacity: Option<String>,
        /// How generations are backed.
        #[arg(long, value_enum, default_value_t = MountMode::Auto)]
        mount_mode: MountMode,
        /// Mount a tmpfs of the agent's own at the root when it is empty, so
        /// every generation gets huge pages (docs/csi.md).
        #[arg(long, value_enum, default_value_t = RootTmpfsMode::Auto)]
        root_tmpfs: RootTmpfsMode,
        #[command(flatten)]
        root_tmpfs_options: RootTmpfsFlags,
        /// CSI target paths must lie inside this directory.
        #[arg(long, default_value = "/var/lib/kubelet")]
        kubelet_dir: PathBuf,
        /// Seconds a publish waits for a fill before answering "still filling".
        #[arg(long, default_value_t = 30.0)]
        publish_wait: f64,
        /// Serve /metrics, /healthz and /readyz here.
        #[arg(long, default_value = "0.0.0.0:9464")]
        metrics_addr: std::net::SocketAddr,
        /// Seconds between Lease renewals (it expires after three).
        #[arg(long, default_value_t = 5)]
        renew_seconds: u64,
        /// Host directory whose files `file://` sources may read (repeatable;
        /// none by default: tenants must not read node files). Opened
        /// beneath the directory without following symlinks.
        #[arg(long = "allow-file-dir")]
        allow_file_dirs: Vec<PathBuf>,
        /// Internal network (CIDR) sources may be fetched from, e.g. an
        /// in-cluster object store (repeatable; loopback, private and
        /// cluster ranges are refused by default; link-local never allowed).
        #[arg(long = "allow-network")]
        allow_networks: Vec<ipnet::IpNet>,
        /// Send http(s) sources through HTTP(S)_PROXY from the environment.
        /// The proxy resolves names itself, past the address checks, so it
        /// must enforce the same egress rules (no metadata, no internal).
        #[arg(long)]
        use_env_proxy: bool,
        /// Seconds a namespace or wrapper stays listed as consumed on this
        /// node (Lease annotation, for `placement: Consumers`) after its
        /// last pod here unmounted it.
        #[arg(long, default_value_t = 300)]
        consumer_grace_seconds: u64,
        #[command(flatten)]
        fill: FillFlags,
        #[command(flatten)]
        peer: PeerFlags,
    },
    /// List wrappers, generations, sizes and state under the root.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_INVALID)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let root = VolumeRoot::new(&cli.root);
    match cli.command {
        Command::Run {
            kubeconfig,
            namespace,
            capacity,
            mount_mode,
            root_tmpfs,
            root_tmpfs_options,
            kubelet_dir,
            publish_wait,
            metrics_addr,
            renew_seconds,
            allow_file_dirs,
            allow_networks,
            use_env_proxy,
            consumer_grace_seconds,
            fill,
            peer,
        } => {
            let fill = fill.policy(true)?;
            let policy = SourcePolicy {
                use_env_proxy,
                ..SourcePolicy::cluster(allow_file_dirs, allow_networks)
            };
            let capacity = capacity.as_deref().map(parse_size).transpose()?;
            root_tmpfs_options.apply(&cli.root, root_tmpfs)?;
            let node = cli.node_id.clone().unwrap_or_else(zerocopy_node_agent::serve::hostname);
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            runtime.block_on(async {
                let config = match &kubeconfig {
                    Some(path) => {
                        let kc = kube::config::Kubeconfig::read_from(path)
                            .with_context(|| format!("reading {}", path.display()))?;
                        kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?
                    }
                    None => kube::Config::infer().await?,
                };
                let client = kube::Client::try_from(config)?;
                let mut engine = FillEngine::new(root.clone(), capacity, mount_mode, policy)
                    .with_context(|| format!("preparing volume root {}", cli.root.display()))?
                    .with_hf_endpoint(cli.hf_endpoint.clone())
                    .with_secrets(std::sync::Arc::new(zerocopy_node_agent::secrets::KubeSecrets::new(
                        client.clone(),
                    )));
                let peers = match (peer.token()?, peer.peer_addr) {
                    (Some(token), Some(_)) => {
                        let peers = std::sync::Arc::new(zerocopy_node_agent::cluster::ReplicaPeers::new(node.clone()));
                        engine = engine.with_peers(peers.clone(), &token)?;
                        Some(peers)
                    }
                    _ => None,
                };
                let serve = zerocopy_node_agent::serve::ServeOptions {
                    files: vec![],
                    csi_socket: cli.csi_socket.clone(),
                    state_dir: cli.state_dir.clone(),
                    node_id: node.clone(),
                    kubelet_dir: Some(kubelet_dir),
                    publish_wait: std::time::Duration::from_secs_f64(publish_wait),
                    metrics_addr: Some(metrics_addr),
                    watch_interval: std::time::Duration::from_secs(2),
                    fill,
                    peer: peer.options(capacity)?,
                };
                let opts = zerocopy_node_agent::cluster::RunOptions {
                    node,
                    lease_namespace: namespace,
                    capacity,
                    renew_every: std::time::Duration::from_secs(renew_seconds.max(1)),
                    status_every: std::time::Duration::from_secs(1),
                    consumer_grace: std::time::Duration::from_secs(consumer_grace_seconds),
                };
                zerocopy_node_agent::cluster::run(
                    client,
                    std::sync::Arc::new(engine),
                    serve,
                    opts,
                    peers,
                    shutdown_signal(),
                )
                .await
                .context("running")
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Standalone {
            files,
            capacity,
            mount_mode,
            root_tmpfs,
            root_tmpfs_options,
            prune,
            quiet,
            serve,
            kubelet_dir,
            publish_wait,
            metrics_addr,
            watch_interval,
            fill,
            peer,
        } => {
            let capacity = capacity.as_deref().map(parse_size).transpose()?;
            // Every problem in every file, before anything is filled.
            let loaded = if serve {
                manifests::load_for_serve(&files)
            } else {
                manifests::load_valid(&files)
            };
            let wrappers = match loaded {
                Ok(w) => w,
                Err(e) => {
                    eprintln!("{e}\nnothing was filled; fix the files and run again");
                    return Ok(ExitCode::from(EXIT_INVALID));
                }
            };
            let secrets = match manifests::load_secrets(&files) {
                Ok(s) => std::sync::Arc::new(s),
                Err(e) => {
                    eprintln!("{e}\nnothing was filled; fix the files and run again");
                    return Ok(ExitCode::from(EXIT_INVALID));
                }
            };
            root_tmpfs_options.apply(&cli.root, root_tmpfs)?;
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            if serve {
                let opts = zerocopy_node_agent::serve::ServeOptions {
                    files: files.clone(),
                    csi_socket: cli.csi_socket.clone(),
                    state_dir: cli.state_dir.clone(),
                    node_id: cli.node_id.clone().unwrap_or_else(zerocopy_node_agent::serve::hostname),
                    kubelet_dir,
                    publish_wait: std::time::Duration::from_secs_f64(publish_wait),
                    metrics_addr,
                    watch_interval: std::time::Duration::from_secs_f64(watch_interval),
                    fill: fill.policy(prune)?,
                    peer: peer.options(capacity)?,
                };
                runtime.block_on(async {
                    let engine = FillEngine::new(root.clone(), capacity, mount_mode, SourcePolicy::standalone())
                        .with_context(|| format!("preparing volume root {}", cli.root.display()))?
                        .with_hf_endpoint(cli.hf_endpoint.clone())
                        .with_secrets(secrets.clone());
                    zerocopy_node_agent::serve::serve(std::sync::Arc::new(engine), wrappers, opts, shutdown_signal())
                        .await
                        .context("serving")
                })?;
                return Ok(ExitCode::SUCCESS);
            }
            let report = runtime.block_on(async {
                let engine = FillEngine::new(root.clone(), capacity, mount_mode, SourcePolicy::standalone())
                    .with_context(|| format!("preparing volume root {}", cli.root.display()))?
                    .with_hf_endpoint(cli.hf_endpoint.clone())
                    .with_secrets(secrets.clone());
                let opts = standalone::Options {
                    progress: !quiet && std::io::stderr().is_terminal(),
                    prune,
                };
                standalone::reconcile(&engine, &wrappers, opts)
                    .await
                    .context("reconciling")
            })?;
            println!("{}", standalone::summary_table(&report, root.path()));
            for w in &report.wrappers {
                if let Err(e) = &w.outcome {
                    eprintln!("error: {e}");
                }
            }
            Ok(if report.all_ready() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_FILL_FAILED)
            })
        }
        Command::Status { json } => {
            let rows = status::collect(&root).with_context(|| format!("reading {}", cli.root.display()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!("{}", status::table(&rows));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,zerocopy_node_agent=info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
