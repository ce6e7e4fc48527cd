//! Indexes the controllers keep beside the reflector caches, so a reconcile
//! costs O(nodes of that wrapper) and a node change wakes only the wrappers
//! whose placement it can change. Pure (no API server): fed watcher events,
//! unit-tested with plain objects.
//!
//! - [`ReplicaIndex`]: ModelReplicas by wrapper and by node.
//! - [`NodeViews`]: what placement sees of each node (labels other than the
//!   operator's own ready labels, readiness, cordon), to tell a change that
//!   matters from a ready-label write or a status heartbeat.
//! - [`affected_by_node`]: the wrappers a node change can move.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;

use k8s_openapi::api::core::v1::Node;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::ResourceExt;
use zerocopy_api::labels::READY_LABEL_PREFIX;
use zerocopy_api::ModelReplica;

/// A wrapper: (namespace, name).
pub type WrapperKey = (String, String);

#[derive(Default)]
struct Maps {
    /// Each replica's keys, to undo them when it changes or goes.
    entries: HashMap<ObjectRef<ModelReplica>, (WrapperKey, String)>,
    by_wrapper: HashMap<WrapperKey, HashSet<ObjectRef<ModelReplica>>>,
    by_node: HashMap<String, HashSet<ObjectRef<ModelReplica>>>,
}

impl Maps {
    fn insert(&mut self, r: &ModelReplica) {
        let key = ObjectRef::from_obj(r);
        let wrapper = (r.namespace().unwrap_or_default(), r.spec.wrapper.clone());
        let node = r.spec.node.clone();
        if self.entries.get(&key) == Some(&(wrapper.clone(), node.clone())) {
            return;
        }
        self.remove(&key);
        self.by_wrapper.entry(wrapper.clone()).or_default().insert(key.clone());
        self.by_node.entry(node.clone()).or_default().insert(key.clone());
        self.entries.insert(key, (wrapper, node));
    }

    fn remove(&mut self, key: &ObjectRef<ModelReplica>) {
        let Some((wrapper, node)) = self.entries.remove(key) else {
            return;
        };
        if let Some(set) = self.by_wrapper.get_mut(&wrapper) {
            set.remove(key);
            if set.is_empty() {
                self.by_wrapper.remove(&wrapper);
            }
        }
        if let Some(set) = self.by_node.get_mut(&node) {
            set.remove(key);
            if set.is_empty() {
                self.by_node.remove(&node);
            }
        }
    }
}

/// ModelReplicas by wrapper and by node, kept from the replica watch (the
/// objects themselves stay in the reflector's store).
#[derive(Default)]
pub struct ReplicaIndex {
    live: Mutex<Maps>,
    /// A re-list in progress: built aside and swapped in at `InitDone`, as
    /// the reflector does with its store.
    relist: Mutex<Option<Maps>>,
}

impl ReplicaIndex {
    /// Applies one watcher event.
    pub fn apply(&self, event: &watcher::Event<ModelReplica>) {
        let mut relist = self.relist.lock().unwrap_or_else(|p| p.into_inner());
        let live = || self.live.lock().unwrap_or_else(|p| p.into_inner());
        match event {
            watcher::Event::Apply(r) => live().insert(r),
            watcher::Event::Delete(r) => live().remove(&ObjectRef::from_obj(r)),
            watcher::Event::Init => *relist = Some(Maps::default()),
            watcher::Event::InitApply(r) => relist.get_or_insert_with(Maps::default).insert(r),
            watcher::Event::InitDone => {
                if let Some(fresh) = relist.take() {
                    *live() = fresh;
                }
            }
        }
    }

    /// The replicas of one wrapper.
    pub fn of_wrapper(&self, namespace: &str, name: &str) -> Vec<ObjectRef<ModelReplica>> {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.by_wrapper
            .get(&(namespace.to_string(), name.to_string()))
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The wrappers with a replica on `node`.
    pub fn wrappers_on(&self, node: &str) -> HashSet<WrapperKey> {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.by_node
            .get(node)
            .map(|s| {
                s.iter()
                    .filter_map(|k| live.entries.get(k))
                    .map(|(w, _)| w.clone())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// What placement sees of a node, without the operator's own ready labels
/// (writing them must not wake every wrapper again).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeView {
    pub labels: BTreeMap<String, String>,
    pub ready: bool,
    pub schedulable: bool,
}

impl NodeView {
    pub fn of(n: &Node) -> NodeView {
        NodeView {
            labels: n
                .labels()
                .iter()
                .filter(|(k, _)| !k.starts_with(READY_LABEL_PREFIX))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            ready: n
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True")),
            schedulable: !n.spec.as_ref().and_then(|s| s.unschedulable).unwrap_or(false),
        }
    }
}

/// A node whose view changed: (name, before, after); `None` is absent.
pub type NodeChange = (String, Option<NodeView>, Option<NodeView>);

/// The last view of every node, fed node watcher events; yields the
/// changes that matter. The first listing only records (every wrapper is
/// reconciled at start anyway); a later re-list reports what changed while
/// the watch was down, including nodes that went.
#[derive(Default)]
pub struct NodeViews {
    views: HashMap<String, NodeView>,
    relist: Option<HashMap<String, NodeView>>,
    primed: bool,
}

impl NodeViews {
    pub fn apply(&mut self, event: &watcher::Event<Node>) -> Vec<NodeChange> {
        match event {
            watcher::Event::Apply(n) => self.set(n.name_any(), Some(NodeView::of(n))).into_iter().collect(),
            watcher::Event::Delete(n) => self.set(n.name_any(), None).into_iter().collect(),
            watcher::Event::Init => {
                self.relist = Some(HashMap::new());
                vec![]
            }
            watcher::Event::InitApply(n) => {
                self.relist
                    .get_or_insert_with(HashMap::new)
                    .insert(n.name_any(), NodeView::of(n));
                vec![]
            }
            watcher::Event::InitDone => {
                let fresh = self.relist.take().unwrap_or_default();
                let old = std::mem::replace(&mut self.views, fresh);
                if !std::mem::replace(&mut self.primed, true) {
                    return vec![];
                }
                let mut changes: Vec<NodeChange> = old
                    .iter()
                    .filter(|(name, view)| self.views.get(*name) != Some(*view))
                    .map(|(name, view)| (name.clone(), Some(view.clone()), self.views.get(name).cloned()))
                    .collect();
                changes.extend(
                    self.views
                        .iter()
                        .filter(|(name, _)| !old.contains_key(*name))
                        .map(|(name, view)| (name.clone(), None, Some(view.clone()))),
                );
                changes
            }
        }
    }

    /// The current view of `node`.
    pub fn get(&self, node: &str) -> Option<&NodeView> {
        self.views.get(node)
    }

    fn set(&mut self, name: String, view: Option<NodeView>) -> Option<NodeChange> {
        let old = match &view {
            Some(v) => self.views.insert(name.clone(), v.clone()),
            None => self.views.remove(&name),
        };
        (old != view).then_some((name, old, view))
    }
}

fn matches(selector: &BTreeMap<String, String>, view: Option<&NodeView>) -> bool {
    view.is_some_and(|v| selector.iter().all(|(k, val)| v.labels.get(k) == Some(val)))
}

/// The wrappers (each with its nodeSelector) whose placement a node change
/// can move: those with a replica there (`holding`), and those whose
/// selector matches the node before or after, unless the node matched both
/// times with the same readiness and cordon (a label they do not select on).
pub fn affected_by_node<'a>(
    change: &NodeChange,
    wrappers: impl IntoIterator<Item = (&'a WrapperKey, &'a BTreeMap<String, String>)>,
    holding: &HashSet<WrapperKey>,
) -> Vec<WrapperKey> {
    let (_, before, after) = change;
    let state = |v: &Option<NodeView>| v.as_ref().map(|v| (v.ready, v.schedulable));
    let state_changed = state(before) != state(after);
    wrappers
        .into_iter()
        .filter(|(key, selector)| {
            if holding.contains(*key) {
                return true;
            }
            let (was, is) = (matches(selector, before.as_ref()), matches(selector, after.as_ref()));
            was != is || (is && state_changed)
        })
        .map(|(key, _)| key.clone())
        .collect()
}

/// The wrappers a change of the agent on a node (its Lease: presence,
/// capacity, consumers) can move: those with a replica there, and those whose
/// selector matches the node (`view`, `None` when the node is unknown).
pub fn affected_by_agent<'a>(
    view: Option<&NodeView>,
    wrappers: impl IntoIterator<Item = (&'a WrapperKey, &'a BTreeMap<String, String>)>,
    holding: &HashSet<WrapperKey>,
) -> Vec<WrapperKey> {
    wrappers
        .into_iter()
        .filter(|(key, selector)| holding.contains(*key) || matches(selector, view))
        .map(|(key, _)| key.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(ns: &str, wrapper: &str, node: &str) -> ModelReplica {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "zerocopy.dev/v1alpha1", "kind": "ModelReplica",
            "metadata": {"name": format!("{wrapper}.{node}"), "namespace": ns},
            "spec": {"wrapper": wrapper, "node": node, "generation": "g", "pipeline": {"components": []}}
        }))
        .unwrap()
    }

    fn node(name: &str, labels: &[(&str, &str)], ready: bool) -> Node {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>()},
            "status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}
        }))
        .unwrap()
    }

    fn key(ns: &str, name: &str) -> WrapperKey {
        (ns.into(), name.into())
    }

    #[test]
    fn replicas_by_wrapper_and_node_follow_the_watch() {
        let idx = ReplicaIndex::default();
        idx.apply(&watcher::Event::Init);
        for (w, n) in [("a", "n1"), ("a", "n2"), ("b", "n1")] {
            idx.apply(&watcher::Event::InitApply(replica("ml", w, n)));
        }
        assert!(
            idx.of_wrapper("ml", "a").is_empty(),
            "a re-list shows up whole, at InitDone"
        );
        idx.apply(&watcher::Event::InitDone);
        assert_eq!(idx.of_wrapper("ml", "a").len(), 2);
        assert_eq!(idx.of_wrapper("other", "a").len(), 0, "namespaces apart");
        assert_eq!(idx.wrappers_on("n1"), HashSet::from([key("ml", "a"), key("ml", "b")]));
        idx.apply(&watcher::Event::Delete(replica("ml", "b", "n1")));
        assert_eq!(idx.wrappers_on("n1"), HashSet::from([key("ml", "a")]));
        // Applying the same object twice changes nothing; a new one adds.
        idx.apply(&watcher::Event::Apply(replica("ml", "a", "n1")));
        idx.apply(&watcher::Event::Apply(replica("ml", "c", "n3")));
        assert_eq!(idx.of_wrapper("ml", "a").len(), 2);
        assert_eq!(idx.wrappers_on("n3"), HashSet::from([key("ml", "c")]));
        // A re-list that lost a replica forgets it.
        idx.apply(&watcher::Event::Init);
        idx.apply(&watcher::Event::InitApply(replica("ml", "a", "n1")));
        idx.apply(&watcher::Event::InitDone);
        assert_eq!(idx.of_wrapper("ml", "a").len(), 1);
        assert!(idx.wrappers_on("n3").is_empty());
    }

    #[test]
    fn ready_labels_and_heartbeats_are_no_change() {
        let mut views = NodeViews::default();
        views.apply(&watcher::Event::Init);
        views.apply(&watcher::Event::InitApply(node("n1", &[("pool", "gpu")], true)));
        assert!(
            views.apply(&watcher::Event::InitDone).is_empty(),
            "the first listing only records"
        );
        let labelled = node("n1", &[("pool", "gpu"), ("ready.zerocopy.dev/ml.a", "true")], true);
        assert!(views.apply(&watcher::Event::Apply(labelled)).is_empty());
        let changes = views.apply(&watcher::Event::Apply(node("n1", &[("pool", "cpu")], true)));
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].1.as_ref().unwrap().labels["pool"], "gpu");
        let gone = views.apply(&watcher::Event::Delete(node("n1", &[("pool", "cpu")], true)));
        assert_eq!(gone[0].2, None);
        // A re-list reports what changed while the watch was down.
        views.apply(&watcher::Event::Init);
        views.apply(&watcher::Event::InitApply(node("n2", &[], true)));
        let changes = views.apply(&watcher::Event::InitDone);
        assert_eq!(
            changes,
            vec![("n2".to_string(), None, Some(NodeView::of(&node("n2", &[], true))))]
        );
    }

    #[test]
    fn a_node_change_wakes_only_wrappers_it_can_move() {
        let gpu = BTreeMap::from([("pool".to_string(), "gpu".to_string())]);
        let cpu = BTreeMap::from([("pool".to_string(), "cpu".to_string())]);
        let all = BTreeMap::new();
        let wrappers = [
            (key("ml", "on-gpu"), gpu),
            (key("ml", "on-cpu"), cpu),
            (key("ml", "everywhere"), all),
        ];
        let view = |pool: &str, ready: bool| Some(NodeView::of(&node("n1", &[("pool", pool)], ready)));
        let none = HashSet::new();
        let run = |before, after, holding: &HashSet<WrapperKey>| {
            let mut out = affected_by_node(
                &("n1".to_string(), before, after),
                wrappers.iter().map(|(k, s)| (k, s)),
                holding,
            );
            out.sort();
            out.into_iter().map(|(_, n)| n).collect::<Vec<_>>()
        };
        // Relabelled gpu -> cpu: both pools' wrappers, not the one matching both times.
        assert_eq!(
            run(view("gpu", true), view("cpu", true), &none),
            vec!["on-cpu", "on-gpu"]
        );
        // NotReady: every wrapper that selects it.
        assert_eq!(
            run(view("gpu", true), view("gpu", false), &none),
            vec!["everywhere", "on-gpu"]
        );
        // A label nobody selects on: only a wrapper holding a replica there.
        let mut other = view("gpu", true);
        if let Some(v) = other.as_mut() {
            v.labels.insert("zone".into(), "b".into());
        }
        assert!(run(view("gpu", true), other.clone(), &none).is_empty());
        let holding = HashSet::from([key("ml", "everywhere")]);
        assert_eq!(run(view("gpu", true), other, &holding), vec!["everywhere"]);
        // A new node, a deleted node.
        assert_eq!(run(None, view("cpu", true), &none), vec!["everywhere", "on-cpu"]);
        assert_eq!(run(view("cpu", true), None, &none), vec!["everywhere", "on-cpu"]);
    }
}
