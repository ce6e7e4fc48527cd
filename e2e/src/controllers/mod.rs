//! The simulator's stand-ins for kube-scheduler, kube-controller-manager's
//! Job controller, and each node's kubelet. They work on the store directly
//! (not over HTTP): their writes go through the same write path and produce
//! the same watch events as a client's.

pub mod events;
pub mod jobs;
pub mod kubelet;
pub mod scheduler;

use std::time::Duration;

use tokio::sync::watch;

use crate::apiserver::Store;

/// Runs `pass` after every burst of changes in the store, and every 500 ms
/// regardless (deadlines, retries), until shutdown.
pub async fn run_on_changes(store: Store, mut shutdown: watch::Receiver<bool>, pass: fn(&Store)) {
    let mut rx = store.subscribe();
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = rx.recv() => { while rx.try_recv().is_ok() {} }
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        let s = store.clone();
        let _ = tokio::task::spawn_blocking(move || pass(&s)).await;
    }
}
