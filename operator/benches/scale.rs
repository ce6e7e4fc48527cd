//! Operator at scale in the simulator: N nodes × W wrappers (default 1,000 ×
//! 10), then, when asked, T queued ModelTasks. The node agents here are
//! **simulated status writers** (in-process, writing straight into the
//! simulator's store: a Lease per node, and a Ready status for every
//! replica), and so is the Job controller (a task's Job runs until the
//! benchmark marks every Job Complete at once), so every HTTP request the API
//! server counts is the operator's. The operator is the real release binary,
//! in its own process, so its peak RSS is its own.
//!
//! Prints a table and writes docs/benchmarks-operator-scale.json (or `SCALE_OUT`).
//!     cargo bench -p zerocopy-operator --bench scale [-- NODES WRAPPERS]
//!     SCALE_NODES=1000 SCALE_WRAPPERS=100 SCALE_TASKS=1000 \
//!         SCALE_OUT=docs/benchmarks-operator-scale-1000x100.json cargo bench -p zerocopy-operator --bench scale
//! `OPERATOR_BIN` runs another operator binary (an older build, for a before/after).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use zerocopy_e2e::apiserver::store::{now, EventKind, Sub};
use zerocopy_e2e::apiserver::{ApiServer, ApiServerOptions, Store};

const NS: &str = "bench";
const SYSTEM: &str = "zerocopy-system";

fn create(store: &Store, group: &str, plural: &str, ns: &str, obj: Value) {
    let t = store.resource_type(group, plural).unwrap();
    store.create(&t, ns, obj).unwrap();
}

/// The simulated agents: every replica whose status does not describe its
/// generation becomes Ready with 1 GiB.
fn agents(store: Store) {
    let t = store.resource_type("zerocopy.dev", "modelreplicas").unwrap();
    let mut rx = store.subscribe();
    loop {
        let ev = match rx.blocking_recv() {
            Ok(ev) => ev,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                // Fell behind: rescan everything.
                let (all, _, _) = store.list(&t, None, &Default::default()).unwrap();
                for r in all {
                    mark_ready(&store, &t, &r);
                }
                continue;
            }
            Err(_) => return,
        };
        if ev.type_key.1 != "modelreplicas" || ev.kind == EventKind::Deleted {
            continue;
        }
        mark_ready(&store, &t, &ev.object);
    }
}

fn mark_ready(store: &Store, t: &zerocopy_e2e::apiserver::types::ResourceType, r: &Value) {
    let generation = r["spec"]["generation"].clone();
    if r["status"]["generation"] == generation && r["status"]["phase"] == "Ready" {
        return;
    }
    let (ns, name) = (
        r["metadata"]["namespace"].as_str().unwrap_or(""),
        r["metadata"]["name"].as_str().unwrap_or(""),
    );
    let _ = store.modify(t, ns, name, Sub::Status, |o| {
        o["status"] = json!({"phase": "Ready", "generation": generation, "digest": generation,
            "bytesTotal": 1u64 << 30, "bytesDone": 1u64 << 30, "mounts": 0});
    });
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// Every `model-W` Ready on all the nodes of its pool (`pools` 1: every node).
fn all_ready(store: &Store, wrappers: usize, nodes: usize, pools: usize) -> bool {
    let t = store.resource_type("zerocopy.dev", "modelwrappers").unwrap();
    let (ws, _, _) = store.list(&t, Some(NS), &Default::default()).unwrap();
    let in_pool = |p: usize| (0..nodes).filter(|i| i % pools == p).count() as u64;
    ws.iter()
        .filter_map(|w| {
            let i: usize = w["metadata"]["name"].as_str()?.strip_prefix("model-")?.parse().ok()?;
            (w["status"]["phase"] == "Ready" && w["status"]["readyNodes"].as_u64() == Some(in_pool(i % pools)))
                .then_some(())
        })
        .count()
        == wrappers
}

/// Tasks whose status satisfies `done`.
fn tasks_where(store: &Store, done: impl Fn(&Value) -> bool) -> usize {
    let t = store.resource_type("zerocopy.dev", "modeltasks").unwrap();
    let (ts, _, _) = store.list(&t, Some(NS), &Default::default()).unwrap();
    ts.iter().filter(|t| done(&t["status"])).count()
}

/// The simulated Job controller's verdict: every Job Complete.
fn complete_all_jobs(store: &Store) -> usize {
    let t = store.resource_type("batch", "jobs").unwrap();
    let (jobs, _, _) = store.list(&t, Some(NS), &Default::default()).unwrap();
    for j in &jobs {
        let name = j["metadata"]["name"].as_str().unwrap_or("");
        let _ = store.modify(&t, NS, name, Sub::Status, |o| {
            o["status"] = json!({"startTime": now(), "completionTime": now(), "succeeded": 1,
                "conditions": [{"type": "Complete", "status": "True", "reason": "Completed"}]});
        });
    }
    jobs.len()
}

/// The simulator holds every object and its watch history in this process:
/// stop the run (and the operator) before it takes the shared machine's
/// memory (`SCALE_MAX_RSS_GIB`, default 8).
fn guard_memory(operator: u32) {
    let limit_kib = env_usize("SCALE_MAX_RSS_GIB").unwrap_or(8) as u64 * 1024 * 1024;
    std::thread::spawn(move || loop {
        let rss = std::fs::read_to_string("/proc/self/status")
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .unwrap_or(0);
        if rss > limit_kib {
            eprintln!(
                "the simulator uses {} MiB, over SCALE_MAX_RSS_GIB: stopping",
                rss / 1024
            );
            let _ = std::process::Command::new("kill").arg(operator.to_string()).status();
            std::process::exit(3);
        }
        std::thread::sleep(Duration::from_millis(500));
    });
}

fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok()?.parse().ok()
}

/// Waits until `done` (checked every 100 ms) or `limit`; returns whether it happened.
/// The operator's pid, for [`until`] to notice that it exited.
static OPERATOR: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

fn operator_alive() -> bool {
    let pid = OPERATOR.load(std::sync::atomic::Ordering::Relaxed);
    pid == 0
        || std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| s.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
}

async fn until(limit: Duration, done: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while !done() {
        if Instant::now() > deadline {
            return false;
        }
        if !operator_alive() {
            eprintln!("the operator exited; its log is in SCALE_OPERATOR_LOG (default: the run's temp dir)");
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    true
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let nodes: usize = args
        .first()
        .and_then(|a| a.parse().ok())
        .or(env_usize("SCALE_NODES"))
        .unwrap_or(1000);
    let wrappers: usize = args
        .get(1)
        .and_then(|a| a.parse().ok())
        .or(env_usize("SCALE_WRAPPERS"))
        .unwrap_or(10);
    let mut tasks = env_usize("SCALE_TASKS").unwrap_or(0);
    // Node pools (label `pool`), wrapper W selecting pool W % POOLS; 1: every
    // wrapper on every node.
    let pools = env_usize("SCALE_POOLS").unwrap_or(1).max(1);
    let limit = Duration::from_secs(env_usize("SCALE_DEADLINE_SECONDS").unwrap_or(600) as u64);
    // Watch history the simulator keeps (events, each a whole object): at
    // 1,000 x 100 a node carries 100 ready labels, and 500,000 events of
    // that size no longer fit in this machine's memory.
    let history = env_usize("SCALE_HISTORY").unwrap_or(if nodes * wrappers / pools > 20_000 {
        50_000
    } else {
        500_000
    });
    let api = ApiServer::start(ApiServerOptions {
        history,
        ..Default::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.write_kubeconfig(&dir.path().join("kubeconfig")).unwrap();
    let store = api.store.clone();
    for ns in [NS, SYSTEM] {
        create(
            &store,
            "",
            "namespaces",
            "",
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
        );
    }
    let crds = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
    for e in std::fs::read_dir(crds).unwrap() {
        let crd: Value = serde_yaml::from_str(&std::fs::read_to_string(e.unwrap().path()).unwrap()).unwrap();
        create(&store, "apiextensions.k8s.io", "customresourcedefinitions", "", crd);
    }
    for i in 0..nodes {
        let name = format!("node-{i:04}");
        create(
            &store,
            "",
            "nodes",
            "",
            json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "pool": format!("p{}", i % pools)}},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}}),
        );
        create(
            &store,
            "coordination.k8s.io",
            "leases",
            SYSTEM,
            json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": name, "annotations": {"zerocopy.dev/capacity-bytes": (64u64 << 30).to_string(), "zerocopy.dev/used-bytes": "0"}},
            "spec": {"holderIdentity": name, "leaseDurationSeconds": 3600, "renewTime": now().replace('Z', ".000000Z")}}),
        );
    }
    let s = store.clone();
    std::thread::spawn(move || agents(s));

    let log = std::env::var_os("SCALE_OPERATOR_LOG")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| dir.path().join("operator.log"));
    let bin = std::env::var("OPERATOR_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_zerocopy-operator").into());
    let mut op = std::process::Command::new(&bin)
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args([
            "--namespace",
            SYSTEM,
            "--agent-namespace",
            SYSTEM,
            "--metrics-addr",
            "127.0.0.1:0",
            "--identity",
            "bench",
        ])
        .env("RUST_LOG", "warn")
        .arg("--log-format")
        .arg("text")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let pid = op.id();
    OPERATOR.store(pid, std::sync::atomic::Ordering::Relaxed);
    guard_memory(pid);
    // Let it take the lease and sync its caches before the clock starts.
    let lease_t = store.resource_type("coordination.k8s.io", "leases").unwrap();
    while store.get(&lease_t, SYSTEM, "zerocopy-operator").is_err() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = api.stats.for_agent("");

    let started = Instant::now();
    for w in 0..wrappers {
        create(
            &store,
            "zerocopy.dev",
            "modelwrappers",
            NS,
            json!({"apiVersion": "zerocopy.dev/v1alpha1", "kind": "ModelWrapper",
            "metadata": {"name": format!("model-{w}")},
            "spec": {"nodeSelector": if pools > 1 { json!({"pool": format!("p{}", w % pools)}) } else { json!({}) },
                "pipeline": {"components": [{"name": "m", "weights": {"uri": format!("https://models.example/{w}.safetensors"), "sha256": format!("{w:064x}")}}]}}}),
        );
    }
    let converged = until(limit, || all_ready(&store, wrappers, nodes, pools)).await;
    let elapsed = started.elapsed().as_secs_f64();
    let during = api.stats.for_agent("");
    // Steady state: 10 s with nothing changing.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let after = api.stats.for_agent("");
    if !converged {
        // Not converged: the task phase would measure a busy operator.
        tasks = 0;
    }
    let rss_wrappers_mib = peak_rss_kib(pid) as f64 / 1024.0;
    let task_result = if tasks > 0 {
        Some(run_tasks(&api, &store, tasks, limit).await)
    } else {
        None
    };
    let rss_mib = peak_rss_kib(pid) as f64 / 1024.0;
    let operator_exited = !operator_alive();
    if operator_exited {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        eprintln!(
            "the operator exited during the run; last lines of its log:\n{}",
            lines[lines.len().saturating_sub(10)..].join("\n")
        );
    }
    let _ = op.kill();
    let _ = op.wait();

    let requests = during.total - before.total;
    let writes = during.writes - before.writes;
    let first_second = before.per_second.keys().max().copied().unwrap_or(0);
    let peak_qps = during
        .per_second
        .iter()
        .filter(|(s, _)| **s > first_second)
        .map(|(_, n)| *n)
        .max()
        .unwrap_or(0);
    let steady_qps = (after.total - during.total) as f64 / 10.0;
    let result = json!({
        "nodes": nodes, "wrappers": wrappers, "pools": pools, "replicas": wrappers * nodes / pools,
        "converged": converged, "watch_history": history, "operator_exited": operator_exited,
        "seconds_to_all_ready": elapsed, "operator_requests": requests, "operator_writes": writes,
        "mean_qps_during_rollout": requests as f64 / elapsed, "peak_qps": peak_qps,
        "steady_state_qps": steady_qps, "operator_peak_rss_mib": rss_mib,
        "operator_peak_rss_mib_after_wrappers": rss_wrappers_mib, "tasks": task_result,
        "operator": if std::env::var("OPERATOR_BIN").is_ok() { bin.clone() } else { "this tree".into() },
        "agents": "simulated status writers (in-process, not counted as API requests)",
        "qps_per_second": during.per_second.iter().filter(|(s, _)| **s > first_second).map(|(s, n)| json!([s - first_second, n])).collect::<Vec<_>>(),
    });
    println!(
        "operator scale benchmark ({nodes} nodes x {wrappers} wrappers, {pools} pool(s): {} replicas; agents simulated)",
        wrappers * nodes / pools
    );
    println!("| metric | value | target |");
    println!("| --- | --- | --- |");
    println!(
        "| all wrappers Ready | {elapsed:.1} s{} | <= 30 s |",
        if converged { "" } else { " (NOT converged)" }
    );
    println!("| operator API requests | {requests} ({writes} writes) | |");
    println!("| mean QPS during rollout | {:.0} | |", requests as f64 / elapsed);
    println!("| peak QPS (1 s buckets) | {peak_qps} | |");
    println!("| steady-state QPS (10 s after Ready) | {steady_qps:.1} | <= 20 |");
    println!("| operator peak RSS (wrappers) | {rss_wrappers_mib:.0} MiB | <= 150 MB |");
    if let Some(t) = &task_result {
        println!(
            "| {tasks} tasks: all started (Job created) | {:.1} s{} | |",
            t["seconds_to_all_started"].as_f64().unwrap_or(0.0),
            if t["started"] == true { "" } else { " (NOT all)" }
        );
        println!(
            "| {tasks} tasks: requests until all started | {} (mean {:.0} QPS) | |",
            t["requests_until_started"],
            t["mean_qps_until_started"].as_f64().unwrap_or(0.0)
        );
        println!(
            "| {tasks} tasks running: steady-state QPS (10 s) | {:.1} | <= 20 |",
            t["steady_state_qps_running"].as_f64().unwrap_or(0.0)
        );
        println!(
            "| {tasks} tasks: all Succeeded after their Jobs completed | {:.1} s{} | |",
            t["seconds_to_all_succeeded"].as_f64().unwrap_or(0.0),
            if t["succeeded"] == true { "" } else { " (NOT all)" }
        );
        println!("| {tasks} tasks: requests, start to Succeeded | {} | |", t["requests"]);
        println!("| operator peak RSS (end) | {rss_mib:.0} MiB | <= 150 MB |");
    }
    let out = std::env::var_os("SCALE_OUT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/benchmarks-operator-scale.json")
        });
    std::fs::write(&out, serde_json::to_string_pretty(&result).unwrap()).unwrap();
    println!("wrote {}", out.display());
}

/// T ModelTasks queued at once on a task-mode wrapper Ready on one node:
/// time until every one has its Job, the operator's requests meanwhile and
/// while the Jobs run (steady state), then time until all are Succeeded
/// once every Job completes.
async fn run_tasks(api: &ApiServer, store: &Store, tasks: usize, limit: Duration) -> Value {
    create(
        store,
        "zerocopy.dev",
        "modelwrappers",
        NS,
        json!({"apiVersion": "zerocopy.dev/v1alpha1", "kind": "ModelWrapper",
        "metadata": {"name": "task-model"},
        "spec": {"mode": "task", "nodeSelector": {"kubernetes.io/hostname": "node-0000"},
            "pipeline": {"components": [{"name": "m", "weights": {"uri": "https://models.example/task.safetensors", "sha256": format!("{:064x}", 7)}}]},
            "task": {"template": {"spec": {"containers": [{"name": "run", "image": "python:3.12", "command": ["python3", "task.py"]}]}}}}}),
    );
    let t = store.resource_type("zerocopy.dev", "modelwrappers").unwrap();
    let ready = until(limit, || {
        store
            .get(&t, NS, "task-model")
            .is_ok_and(|w| w["status"]["readyNodes"].as_u64() == Some(1))
    })
    .await;
    if !ready {
        eprintln!("the task-mode wrapper never became Ready: no task phase");
        return json!({"tasks": tasks, "error": "the task-mode wrapper never became Ready", "operator_exited": !operator_alive()});
    }
    let before = api.stats.for_agent("");
    let started = Instant::now();
    for i in 0..tasks {
        create(
            store,
            "zerocopy.dev",
            "modeltasks",
            NS,
            json!({"apiVersion": "zerocopy.dev/v1alpha1", "kind": "ModelTask",
            "metadata": {"name": format!("task-{i:05}")}, "spec": {"wrapper": "task-model", "args": ["--n", i.to_string()]}}),
        );
    }
    // Started: the Job exists and the task says so (Ready=True, JobCreated).
    let started_ok = |s: &Value| {
        s["jobName"].is_string()
            && s["conditions"]
                .as_array()
                .is_some_and(|cs| cs.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
    };
    let all_started = until(limit, || tasks_where(store, started_ok) == tasks).await;
    let started_s = started.elapsed().as_secs_f64();
    // The Jobs run: nothing changes. The last status writes and Events of
    // the burst settle for 5 s, then 10 s are counted.
    let at_started = api.stats.for_agent("");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let settled = api.stats.for_agent("");
    tokio::time::sleep(Duration::from_secs(10)).await;
    let running = api.stats.for_agent("");
    let completed = complete_all_jobs(store);
    let released = Instant::now();
    let all_succeeded = until(limit, || tasks_where(store, |s| s["phase"] == "Succeeded") == tasks).await;
    let succeeded_s = released.elapsed().as_secs_f64();
    let end = api.stats.for_agent("");
    let first_second = before.per_second.keys().max().copied().unwrap_or(0);
    json!({
        "tasks": tasks, "started": all_started, "succeeded": all_succeeded, "jobs_completed": completed,
        "seconds_to_all_started": started_s,
        "requests_until_started": at_started.total - before.total,
        "mean_qps_until_started": (at_started.total - before.total) as f64 / started_s,
        "steady_state_qps_running": (running.total - settled.total) as f64 / 10.0,
        "seconds_to_all_succeeded": succeeded_s,
        "requests": end.total - before.total, "writes": end.writes - before.writes,
        "qps_per_second": end.per_second.iter().filter(|(s, _)| **s > first_second).map(|(s, n)| json!([s - first_second, n])).collect::<Vec<_>>(),
    })
}
