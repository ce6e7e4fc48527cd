//! Shared state of the controllers: the client, caches of the objects they
//! read (so a reconcile makes no read requests), the event recorder and metrics.

use std::sync::Arc;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, Patch, PatchParams};
use kube::core::NamespaceResourceScope;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use zerocopy_api::labels::{LEASE_CAPACITY, LEASE_CONSUMERS, LEASE_USED, OPERATOR_MANAGER};
use zerocopy_api::{ModelReplica, ModelWrapper};

use crate::index::ReplicaIndex;
use crate::lenient::Lenient;
use crate::metrics::Metrics;
use crate::placement::{AgentInfo, NodeInfo};

/// Errors of one reconcile; each is retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("building a patch: {0}")]
    Patch(#[from] serde_json::Error),
    #[error("object has no namespace")]
    NoNamespace,
    #[error("the {0} cache stopped before it synced")]
    CacheStopped(&'static str),
}

#[derive(Clone, Debug)]
pub struct Options {
    /// Namespace of the agents' Leases.
    pub agent_namespace: String,
    /// This replica's name (events, leader lease).
    pub identity: String,
    /// How long a NotReady node or one whose agent Lease lapsed keeps its replicas.
    pub node_grace: std::time::Duration,
}

/// The caches the controllers read (reflector stores, filled by watches).
#[derive(Clone)]
pub struct Caches {
    pub nodes: Store<Node>,
    pub leases: Store<Lease>,
    pub replicas: Store<ModelReplica>,
    /// ModelReplicas by wrapper and by node, kept beside `replicas`.
    pub replica_index: Arc<ReplicaIndex>,
    pub wrappers: Store<Lenient<ModelWrapper>>,
    /// Jobs of ModelTasks (label `zerocopy.dev/task`).
    pub jobs: Store<Job>,
    /// Pods of ModelTasks' Jobs (label `zerocopy.dev/task`).
    pub pods: Store<Pod>,
    /// The wrappers as the task controller's own watch saw them.
    pub task_wrappers: Store<Lenient<ModelWrapper>>,
    /// `replicas` is filled (what a wrapper reconcile waits for).
    pub replicas_ready: crate::ready::Ready,
    /// `jobs`, `pods` and `task_wrappers` are filled (what a task reconcile waits for).
    pub task_caches_ready: crate::ready::Ready,
}

pub struct Context {
    pub client: kube::Client,
    pub opts: Options,
    pub caches: Caches,
    pub recorder: Recorder,
    pub metrics: Metrics,
}

impl Context {
    pub fn new(client: kube::Client, opts: Options, caches: Caches, metrics: Metrics) -> Arc<Self> {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: zerocopy_api::labels::OPERATOR_MANAGER.into(),
                instance: Some(opts.identity.clone()),
            },
        );
        Arc::new(Context {
            client,
            opts,
            caches,
            recorder,
            metrics,
        })
    }

    /// Server-side apply of `status` to the status subresource of `K` `ns/name`,
    /// with the operator's field manager (it owns every status field it writes).
    pub async fn apply_status<K>(&self, ns: &str, name: &str, status: &impl serde::Serialize) -> Result<(), Error>
    where
        K: Resource<DynamicType = (), Scope = NamespaceResourceScope> + Clone + DeserializeOwned + std::fmt::Debug,
    {
        let api: Api<K> = Api::namespaced(self.client.clone(), ns);
        let body = serde_json::json!({"apiVersion": K::api_version(&()), "kind": K::kind(&()),
            "metadata": {"name": name}, "status": status});
        api.patch_status(
            name,
            &PatchParams::apply(OPERATOR_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await?;
        self.metrics.write(&K::kind(&()), "status");
        Ok(())
    }

    /// Nodes with their agents, from the caches: O(nodes), each Lease found
    /// by name. Only the labels in `selector_keys` are copied (placement
    /// reads no other; a node carries a ready label per wrapper).
    pub fn node_infos(&self, now: Timestamp, selector_keys: &[&String]) -> Vec<NodeInfo> {
        self.caches
            .nodes
            .state()
            .iter()
            .map(|n| {
                let lease = self
                    .caches
                    .leases
                    .get(&ObjectRef::new(&n.name_any()).within(&self.opts.agent_namespace));
                node_info_with(n, lease.as_deref(), now, Some(selector_keys))
            })
            .collect()
    }

    /// The replicas of one wrapper, from the index and the cache.
    pub fn replicas_of(&self, namespace: &str, name: &str) -> Vec<Arc<ModelReplica>> {
        self.caches
            .replica_index
            .of_wrapper(namespace, name)
            .iter()
            .filter_map(|r| self.caches.replicas.get(r))
            .collect()
    }
}

/// A node as placement sees it.
pub fn node_info(node: &Node, lease: Option<&Lease>, now: Timestamp) -> NodeInfo {
    node_info_with(node, lease, now, None)
}

/// [`node_info`], copying only the labels in `keys` when given.
fn node_info_with(node: &Node, lease: Option<&Lease>, now: Timestamp, keys: Option<&[&String]>) -> NodeInfo {
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let schedulable = !node.spec.as_ref().and_then(|s| s.unschedulable).unwrap_or(false);
    let since = |t: Timestamp| now.duration_since(t).try_into().unwrap_or(std::time::Duration::ZERO);
    let not_ready_for = (!ready).then(|| {
        node.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
            .and_then(|c| c.last_transition_time.as_ref())
            .map_or(std::time::Duration::MAX, |t| since(t.0))
    });
    let live = lease.is_some_and(|l| lease_live(l, now));
    let agent_gone_for = (!live).then(|| lease.and_then(lease_expiry).map_or(std::time::Duration::MAX, since));
    NodeInfo {
        name: node.name_any(),
        labels: match keys {
            None => node.labels().clone(),
            Some(keys) => keys
                .iter()
                .filter_map(|k| Some(((*k).clone(), node.labels().get(*k)?.clone())))
                .collect(),
        },
        ready,
        schedulable,
        down_for: not_ready_for.max(agent_gone_for),
        consumers: lease
            .filter(|l| lease_live(l, now))
            .and_then(|l| l.annotations().get(LEASE_CONSUMERS))
            .map(|v| v.split(',').filter(|c| !c.is_empty()).map(String::from).collect())
            .unwrap_or_default(),
        agent: lease.filter(|l| lease_live(l, now)).map(|l| {
            let ann = l.annotations();
            AgentInfo {
                capacity: ann.get(LEASE_CAPACITY).and_then(|v| v.parse().ok()),
                used: ann.get(LEASE_USED).and_then(|v| v.parse().ok()).unwrap_or(0),
            }
        }),
    }
}

/// An agent's Lease is live while `renewTime + leaseDurationSeconds` is in the future.
pub fn lease_live(lease: &Lease, now: Timestamp) -> bool {
    lease_expiry(lease).is_some_and(|expiry| expiry > now)
}

/// When an agent's Lease expires (or expired).
pub fn lease_expiry(lease: &Lease) -> Option<Timestamp> {
    let spec = lease.spec.as_ref()?;
    let (Some(renew), Some(secs)) = (&spec.renew_time, spec.lease_duration_seconds) else {
        return None;
    };
    renew.0.checked_add(SignedDuration::from_secs(i64::from(secs))).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

    #[test]
    fn leases_expire() {
        let now = Timestamp::now();
        let lease = |ago: i64| Lease {
            spec: Some(LeaseSpec {
                renew_time: Some(MicroTime(now.checked_sub(SignedDuration::from_secs(ago)).unwrap())),
                lease_duration_seconds: Some(15),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(lease_live(&lease(5), now));
        assert!(!lease_live(&lease(20), now));
        assert!(!lease_live(&Lease::default(), now));
    }
}
