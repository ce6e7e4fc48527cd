//! The cluster simulator: a stand-in for a Kubernetes cluster in whole-system
//! tests, because no kube-apiserver, kubelet or container runtime can be
//! installed on this project's machines. See `e2e/README.md` for what it
//! models and what it does not.

pub mod apiserver;
pub mod cluster;
pub mod controllers;

pub use cluster::{AgentMode, Cluster, ClusterOptions, NodeDirs, NodeSpec};
