//! The simulator's stand-ins for kube-scheduler, kube-controller-manager's
//! Job controller, and each node's kubelet. They work on the store directly
//! (not over HTTP): their writes go through the same write path and produce
//! the same watch events as a client's.

pub mod events;
pub mod jobs;
pub mod kubelet;
pub mod scheduler;
