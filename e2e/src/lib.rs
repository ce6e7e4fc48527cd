//! The cluster simulator: a stand-in for a Kubernetes cluster in whole-system
//! tests, because no kube-apiserver, kubelet or container runtime can be
//! installed on this project's machines. See `e2e/README.md` for what it
//! models and what it does not.

pub mod apiserver;
pub mod cluster;
pub mod controllers;

pub use cluster::{AgentMode, Cluster, ClusterOptions, NodeDirs, NodeSpec};

/// Polls `f` every 100 ms until it gives a value; panics after `secs` naming
/// `what` (test support: a timeout is the failure report).
pub async fn wait_for<T, F, Fut>(what: &str, secs: u64, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    wait_for_checked(what, secs, || {}, f).await
}

/// As [`wait_for`], calling `check` between polls so a test can fail at once
/// (e.g. when a process it depends on died) instead of waiting out the bound.
pub async fn wait_for_checked<T, F, Fut>(what: &str, secs: u64, mut check: impl FnMut(), mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        check();
        assert!(
            tokio::time::Instant::now() <= deadline,
            "timed out after {secs}s waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
