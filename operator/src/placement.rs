//! Placement: which nodes hold a ModelWrapper. A pure function over a
//! snapshot of nodes and agents, so every rule is unit-tested.
//!
//! A node is chosen when it matches `nodeSelector`, is Ready and schedulable,
//! runs a live agent (an unexpired Lease), and has room in the agent's
//! capacity for the wrapper's bytes. A node that already holds the wrapper
//! keeps it without a room check (its bytes are already in `used`), keeps it
//! when cordoned (cordon stops new work, it does not wipe the node), and
//! keeps it through a grace period while the node is NotReady or its agent's
//! Lease lapsed (a DaemonSet upgrade, a kubelet blip): re-downloading every
//! model after a 15-second outage costs far more than waiting. When room is
//! short the choice is deterministic: nodes in name order. Every node left
//! out gets a reason.
//!
//! A node whose agent failed this generation's fill for lack of capacity
//! [`CAPACITY_FAILURES_TO_MOVE`] times in a row is left (re-placement): the
//! wrapper stays on its other nodes, and the node is remembered for this
//! generation ([`CapacityMemory`]) until its agent reports more free room,
//! so the wrapper does not bounce back. Where no other node can hold it, the
//! wrapper stays where it is and says why.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Fills of one generation that failed for lack of capacity, in a row, before
/// the wrapper leaves the node. One failure can be a race with a generation
/// that is about to be freed (a pod still mounting it); the agent retries
/// with backoff (10 s, 20 s, ...), so three failures mean about half a minute
/// without room appearing: long enough to not move on a blip, short enough
/// that a user does not wait on a node that cannot hold the model.
pub const CAPACITY_FAILURES_TO_MOVE: u32 = 3;

/// The replica reason the agent reports when a fill does not fit.
pub const CAPACITY_REASON: &str = "InsufficientCapacity";

/// Annotation on a ModelWrapper (written by the operator) remembering the
/// nodes it left for lack of capacity, for one generation: JSON
/// [`CapacityMemory`].
pub const CAPACITY_ANNOTATION: &str = "zerocopy.dev/capacity-failed-nodes";

/// Nodes a wrapper left for lack of capacity, for one generation digest,
/// each with the free bytes its agent reported then (`None`: no limit
/// reported). A node is tried again for a new generation, or once its agent
/// reports more free room than then.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapacityMemory {
    pub generation: String,
    pub nodes: BTreeMap<String, Option<u64>>,
}

impl CapacityMemory {
    /// The memory in an annotation value; anything unreadable is no memory
    /// (the worst case is N more failed attempts).
    pub fn parse(value: Option<&str>) -> CapacityMemory {
        value.and_then(|v| serde_json::from_str(v).ok()).unwrap_or_default()
    }
}

/// A replica of the current generation that failed for lack of capacity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CapacityFailure {
    pub node: String,
    /// Failed attempts in a row.
    pub attempts: u32,
}

/// Free bytes of a node's agent: `None` when it reports no limit (or no agent).
fn free_of(n: &NodeInfo) -> Option<u64> {
    n.agent.and_then(|a| a.capacity.map(|c| c.saturating_sub(a.used)))
}

/// Which nodes to leave for lack of capacity, with the free bytes to
/// remember: those `remembered` for this `generation` whose agent reports no
/// more free room than then, and those whose replica failed
/// [`CAPACITY_FAILURES_TO_MOVE`] times in a row.
pub fn capacity_avoid(
    remembered: &CapacityMemory,
    generation: &str,
    failures: &[CapacityFailure],
    nodes: &[NodeInfo],
) -> BTreeMap<String, Option<u64>> {
    let by_name: BTreeMap<&str, &NodeInfo> = nodes.iter().map(|n| (n.name.as_str(), n)).collect();
    let mut out = BTreeMap::new();
    if remembered.generation == generation {
        for (node, then) in &remembered.nodes {
            let now = by_name.get(node.as_str()).map(|n| free_of(n));
            let more_room = match (then, now) {
                // Gone, or down (no agent): nothing learned; keep the memory.
                (_, None) => false,
                (Some(then), Some(Some(now))) => now > *then,
                (Some(_), Some(None)) => by_name.get(node.as_str()).is_some_and(|n| n.agent.is_some()),
                (None, Some(_)) => false,
            };
            if !more_room {
                out.insert(node.clone(), *then);
            }
        }
    }
    for f in failures {
        if f.attempts >= CAPACITY_FAILURES_TO_MOVE {
            let free = by_name.get(f.node.as_str()).and_then(|n| free_of(n));
            out.entry(f.node.clone()).or_insert(free);
        }
    }
    out
}

/// What to remember after placing with `avoid`: the avoided nodes that were
/// in fact left out (a node kept because nothing else can hold the wrapper
/// is not remembered: its failing replica says so by itself).
pub fn remember(generation: &str, avoid: &BTreeMap<String, Option<u64>>, placement: &Placement) -> CapacityMemory {
    CapacityMemory {
        generation: generation.into(),
        nodes: avoid
            .iter()
            .filter(|(n, _)| !placement.nodes.contains(n))
            .map(|(n, free)| (n.clone(), *free))
            .collect(),
    }
}

/// What placement needs to know about one node.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeInfo {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub ready: bool,
    pub schedulable: bool,
    /// The node's agent, when its Lease is live.
    pub agent: Option<AgentInfo>,
    /// How long the node has been NotReady or without a live agent (the
    /// longer of the two); `None` while it is up. `Duration::MAX` when
    /// unknown (no Lease ever, no transition time).
    pub down_for: Option<Duration>,
    /// What pods on the node consume, from the agent's Lease: namespaces
    /// mounting their catalog, and `namespace/wrapper` mounting one wrapper.
    pub consumers: std::collections::BTreeSet<String>,
}

/// Capacity and use, from the agent's Lease annotations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AgentInfo {
    /// None: the agent reports no limit.
    pub capacity: Option<u64>,
    pub used: u64,
}

/// Why a node does not hold the wrapper.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Excluded {
    SelectorMismatch,
    NotReady,
    Unschedulable,
    NoAgent,
    NoRoom {
        needed: u64,
        free: u64,
    },
    NoConsumer,
    /// Fills of this generation failed there for lack of capacity
    /// ([`CAPACITY_FAILURES_TO_MOVE`] times); left until the agent has more room.
    CapacityFailed,
}

impl std::fmt::Display for Excluded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Excluded::SelectorMismatch => write!(f, "does not match nodeSelector"),
            Excluded::NotReady => write!(f, "node is not Ready"),
            Excluded::Unschedulable => write!(f, "node is cordoned"),
            Excluded::NoAgent => write!(f, "no live zerocopy agent (Lease missing or expired)"),
            Excluded::NoConsumer => write!(f, "no pod of the namespace consumes it there (placement: Consumers)"),
            Excluded::CapacityFailed => write!(
                f,
                "left after {CAPACITY_FAILURES_TO_MOVE} fills failed there for lack of capacity (tried again when its agent reports more free room)"
            ),
            Excluded::NoRoom { needed, free } => write!(
                f,
                "not enough room: needs {}, agent has {} free",
                zerocopy_api::quantity::HumanBytes(*needed),
                zerocopy_api::quantity::HumanBytes(*free)
            ),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Placement {
    /// Chosen nodes, in name order (including those `kept`).
    pub nodes: Vec<String>,
    /// Every node left out, with its reason, in name order.
    pub excluded: Vec<(String, Excluded)>,
    /// Nodes that hold the wrapper and keep it although they would not be
    /// chosen now (cordoned, or down within the grace period), with why.
    pub kept: Vec<(String, Excluded)>,
}

impl Placement {
    /// One line per distinct reason, for the status message: stable text, so
    /// status writes do not flap.
    pub fn summary(&self) -> String {
        let mut by_reason: BTreeMap<String, Vec<&str>> = BTreeMap::new();
        for (node, why) in &self.excluded {
            let key = match why {
                Excluded::NoRoom { .. } => "not enough room in the agent's capacity".to_string(),
                other => other.to_string(),
            };
            by_reason.entry(key).or_default().push(node);
        }
        by_reason
            .iter()
            .map(|(why, nodes)| {
                let shown: Vec<&str> = nodes.iter().take(5).copied().collect();
                let more = if nodes.len() > 5 {
                    format!(" and {} more", nodes.len() - 5)
                } else {
                    String::new()
                };
                format!("{} node(s) {why} ({}{more})", nodes.len(), shown.join(", "))
            })
            .chain(
                self.kept
                    .iter()
                    .map(|(node, why)| format!("{node} keeps its copy: {why}")),
            )
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Which consumers a `placement: Consumers` wrapper follows: its
/// namespace's catalog and itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Follow {
    pub namespace: String,
    pub name: String,
}

impl Follow {
    fn consumed_on(&self, n: &NodeInfo) -> bool {
        n.consumers.contains(&self.namespace) || n.consumers.contains(&format!("{}/{}", self.namespace, self.name))
    }
}

/// Places a wrapper of `bytes` (0 when not known yet) with `selector`;
/// `current` are the nodes that already hold it; a node that holds it and is
/// down for less than `grace` keeps it. With `follow`, only nodes whose agent
/// reports a consumer of it (the agent keeps reporting one for its own grace
/// period after the last pod left). Nodes in `avoid` (see
/// [`capacity_avoid`]) are left out, unless no other node can hold the
/// wrapper: then those that hold it keep it.
pub fn place(
    selector: &BTreeMap<String, String>,
    bytes: u64,
    nodes: &[NodeInfo],
    current: &[String],
    grace: Duration,
    follow: Option<&Follow>,
    avoid: &BTreeMap<String, Option<u64>>,
) -> Placement {
    let p = place_avoiding(selector, bytes, nodes, current, grace, follow, avoid);
    if !p.nodes.is_empty() || avoid.is_empty() {
        return p;
    }
    // Nowhere else to go: the nodes that hold it keep it (and keep retrying).
    let held: BTreeMap<String, Option<u64>> = avoid
        .iter()
        .filter(|(n, _)| !current.contains(n))
        .map(|(n, f)| (n.clone(), *f))
        .collect();
    place_avoiding(selector, bytes, nodes, current, grace, follow, &held)
}

fn place_avoiding(
    selector: &BTreeMap<String, String>,
    bytes: u64,
    nodes: &[NodeInfo],
    current: &[String],
    grace: Duration,
    follow: Option<&Follow>,
    avoid: &BTreeMap<String, Option<u64>>,
) -> Placement {
    let current: std::collections::HashSet<&str> = current.iter().map(String::as_str).collect();
    let mut sorted: Vec<&NodeInfo> = nodes.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut out = Placement::default();
    for n in sorted {
        let held = current.contains(n.name.as_str());
        let down = if !n.ready {
            Some(Excluded::NotReady)
        } else if n.agent.is_none() {
            Some(Excluded::NoAgent)
        } else {
            None
        };
        let why = if selector.iter().any(|(k, v)| n.labels.get(k) != Some(v)) {
            Some(Excluded::SelectorMismatch)
        } else if let Some(down) = down {
            if held && n.down_for.is_some_and(|d| d < grace) {
                out.kept.push((n.name.clone(), down));
                None
            } else {
                Some(down)
            }
        } else if follow.is_some_and(|f| !f.consumed_on(n)) {
            Some(Excluded::NoConsumer)
        } else if avoid.contains_key(&n.name) {
            Some(Excluded::CapacityFailed)
        } else if !n.schedulable {
            if held {
                out.kept.push((n.name.clone(), Excluded::Unschedulable));
                None
            } else {
                Some(Excluded::Unschedulable)
            }
        } else {
            match n.agent {
                Some(AgentInfo {
                    capacity: Some(cap),
                    used,
                }) if !held => {
                    let free = cap.saturating_sub(used);
                    (bytes > free).then_some(Excluded::NoRoom { needed: bytes, free })
                }
                _ => None,
            }
        };
        match why {
            Some(w) => out.excluded.push((n.name.clone(), w)),
            None => out.nodes.push(n.name.clone()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, labels: &[(&str, &str)], agent: Option<(Option<u64>, u64)>) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ready: true,
            schedulable: true,
            down_for: agent.is_none().then_some(Duration::MAX),
            agent: agent.map(|(capacity, used)| AgentInfo { capacity, used }),
            consumers: Default::default(),
        }
    }

    #[test]
    fn consumers_placement_follows_pods_of_the_namespace() {
        let mut nodes = vec![
            node("a", &[], Some((None, 0))),
            node("b", &[], Some((None, 0))),
            node("c", &[], Some((None, 0))),
            node("d", &[], Some((None, 0))),
        ];
        nodes[0].consumers.insert("ml".into());
        nodes[1].consumers.insert("ml/bert".into());
        nodes[2].consumers.insert("other".into());
        nodes[3].consumers.insert("ml/gpt".into());
        let follow = Follow {
            namespace: "ml".into(),
            name: "bert".into(),
        };
        let p = place(&BTreeMap::new(), 0, &nodes, &["c".into()], GRACE, Some(&follow), &NONE);
        assert_eq!(p.nodes, vec!["a", "b"], "the catalog of ml, and bert itself");
        assert_eq!(
            p.excluded,
            vec![("c".into(), Excluded::NoConsumer), ("d".into(), Excluded::NoConsumer)],
            "a node whose consumers left gives its copy back"
        );
        assert_eq!(
            place(&BTreeMap::new(), 0, &nodes, &[], GRACE, None, &NONE).nodes.len(),
            4
        );
    }

    #[test]
    fn selector_agents_and_readiness() {
        let mut nodes = vec![
            node("c", &[("pool", "gpu")], Some((None, 0))),
            node("a", &[("pool", "gpu")], Some((None, 0))),
            node("b", &[("pool", "cpu")], Some((None, 0))),
            node("d", &[("pool", "gpu")], None),
            node("e", &[("pool", "gpu")], Some((None, 0))),
        ];
        nodes[4].ready = false;
        let sel = BTreeMap::from([("pool".to_string(), "gpu".to_string())]);
        let p = place(&sel, 100, &nodes, &[], GRACE, None, &NONE);
        assert_eq!(p.nodes, vec!["a", "c"]);
        assert_eq!(
            p.excluded,
            vec![
                ("b".into(), Excluded::SelectorMismatch),
                ("d".into(), Excluded::NoAgent),
                ("e".into(), Excluded::NotReady)
            ]
        );
        // Empty selector: every node with an agent.
        assert_eq!(
            place(&BTreeMap::new(), 0, &nodes, &[], GRACE, None, &NONE).nodes,
            vec!["a", "b", "c"]
        );
    }

    #[test]
    fn capacity_shortfall_is_deterministic_and_sticky() {
        let nodes = vec![
            node("n2", &[], Some((Some(1000), 500))),
            node("n1", &[], Some((Some(1000), 900))),
            node("n3", &[], Some((Some(1000), 0))),
        ];
        let p = place(&BTreeMap::new(), 400, &nodes, &[], GRACE, None, &NONE);
        assert_eq!(p.nodes, vec!["n2", "n3"]);
        assert_eq!(
            p.excluded,
            vec![("n1".into(), Excluded::NoRoom { needed: 400, free: 100 })]
        );
        assert!(p.summary().starts_with("1 node(s) not enough room"), "{}", p.summary());
        // Already on n1 (its bytes are counted in used): it stays.
        assert_eq!(
            place(&BTreeMap::new(), 400, &nodes, &["n1".into()], GRACE, None, &NONE).nodes,
            vec!["n1", "n2", "n3"]
        );
    }

    #[test]
    fn a_selector_change_moves_the_set() {
        let nodes = vec![
            node("a", &[("pool", "gpu")], Some((None, 0))),
            node("b", &[("pool", "cpu")], Some((None, 0))),
        ];
        let gpu = BTreeMap::from([("pool".to_string(), "gpu".to_string())]);
        let cpu = BTreeMap::from([("pool".to_string(), "cpu".to_string())]);
        assert_eq!(place(&gpu, 0, &nodes, &[], GRACE, None, &NONE).nodes, vec!["a"]);
        // Holding it on a does not keep a once the selector no longer matches.
        let moved = place(&cpu, 0, &nodes, &["a".into()], GRACE, None, &NONE);
        assert_eq!(moved.nodes, vec!["b"]);
        assert_eq!(moved.excluded, vec![("a".into(), Excluded::SelectorMismatch)]);
    }

    #[test]
    fn nodes_appearing_and_disappearing_change_the_set() {
        let mut nodes = vec![node("a", &[], Some((None, 0)))];
        assert_eq!(
            place(&BTreeMap::new(), 0, &nodes, &[], GRACE, None, &NONE).nodes,
            vec!["a"]
        );
        nodes.push(node("b", &[], Some((None, 0))));
        assert_eq!(
            place(&BTreeMap::new(), 0, &nodes, &["a".into()], GRACE, None, &NONE).nodes,
            vec!["a", "b"]
        );
        nodes.push(node("c", &[], Some((None, 0))));
        nodes[0].schedulable = false;
        nodes[2].schedulable = false;
        // A cordon stops new copies but never wipes the one a node holds.
        let p = place(
            &BTreeMap::new(),
            0,
            &nodes,
            &["a".into(), "b".into()],
            GRACE,
            None,
            &NONE,
        );
        assert_eq!(p.nodes, vec!["a", "b"]);
        assert_eq!(p.kept, vec![("a".into(), Excluded::Unschedulable)]);
        assert_eq!(p.excluded, vec![("c".into(), Excluded::Unschedulable)]);
        assert!(
            p.summary().contains("a keeps its copy: node is cordoned"),
            "{}",
            p.summary()
        );
    }

    #[test]
    fn short_outages_keep_the_copy_and_long_ones_move_it() {
        let mut nodes = vec![node("a", &[], Some((None, 0))), node("b", &[], Some((None, 0)))];
        let held = ["a".to_string(), "b".to_string()];
        // a: agent restarting (Lease lapsed 20 s ago); b: NotReady for 10 s.
        nodes[0].agent = None;
        nodes[0].down_for = Some(Duration::from_secs(20));
        nodes[1].ready = false;
        nodes[1].down_for = Some(Duration::from_secs(10));
        let p = place(&BTreeMap::new(), 0, &nodes, &held, GRACE, None, &NONE);
        assert_eq!(p.nodes, vec!["a", "b"]);
        assert_eq!(
            p.kept,
            vec![("a".into(), Excluded::NoAgent), ("b".into(), Excluded::NotReady)]
        );
        // Not placed there before: a down node gets nothing new.
        assert_eq!(
            place(&BTreeMap::new(), 0, &nodes, &[], GRACE, None, &NONE).nodes,
            Vec::<String>::new()
        );
        // Past the grace period the copy moves.
        nodes[0].down_for = Some(GRACE);
        let p = place(&BTreeMap::new(), 0, &nodes, &held, GRACE, None, &NONE);
        assert_eq!(p.nodes, vec!["b"]);
        assert_eq!(p.excluded, vec![("a".into(), Excluded::NoAgent)]);
    }

    #[test]
    fn repeated_capacity_failures_move_the_wrapper_off_the_node() {
        let nodes = vec![
            node("a", &[], Some((Some(1000), 900))),
            node("b", &[], Some((Some(1000), 0))),
        ];
        let held = ["a".to_string(), "b".to_string()];
        let fail = |attempts| {
            vec![CapacityFailure {
                node: "a".into(),
                attempts,
            }]
        };
        let none = CapacityMemory::default();
        // Two failures: still retrying where it is.
        let avoid = capacity_avoid(&none, "g1", &fail(CAPACITY_FAILURES_TO_MOVE - 1), &nodes);
        assert!(avoid.is_empty());
        let avoid = capacity_avoid(&none, "g1", &fail(CAPACITY_FAILURES_TO_MOVE), &nodes);
        assert_eq!(avoid, BTreeMap::from([("a".to_string(), Some(100))]), "a had 100 free");
        let p = place(&BTreeMap::new(), 0, &nodes, &held, GRACE, None, &avoid);
        assert_eq!(p.nodes, vec!["b"]);
        assert_eq!(p.excluded, vec![("a".into(), Excluded::CapacityFailed)]);
        assert!(p.summary().contains("more free room) (a)"), "{}", p.summary());
        let memory = remember("g1", &avoid, &p);
        assert_eq!(memory.nodes, avoid);

        // Remembered: a stays out though it no longer holds the wrapper and no
        // replica of it fails any more...
        let again = capacity_avoid(&memory, "g1", &[], &nodes);
        let p = place(&BTreeMap::new(), 0, &nodes, &["b".into()], GRACE, None, &again);
        assert_eq!(p.nodes, vec!["b"], "no bouncing back");
        assert_eq!(remember("g1", &again, &p), memory, "a stable memory: no write");
        // ...until its agent reports more free room,
        let mut roomier = nodes.clone();
        roomier[0].agent = Some(AgentInfo {
            capacity: Some(1000),
            used: 500,
        });
        assert!(capacity_avoid(&memory, "g1", &[], &roomier).is_empty());
        // or the generation changes.
        assert!(capacity_avoid(&memory, "g2", &[], &nodes).is_empty());
        // A node that is down keeps its memory.
        let mut down = nodes.clone();
        down[0].agent = None;
        assert_eq!(capacity_avoid(&memory, "g1", &[], &down), memory.nodes);
    }

    #[test]
    fn with_nowhere_else_to_go_the_failing_node_keeps_the_wrapper() {
        let nodes = vec![
            node("a", &[("pool", "gpu")], Some((Some(1000), 900))),
            node("b", &[("pool", "cpu")], Some((Some(1000), 0))),
        ];
        let gpu = BTreeMap::from([("pool".to_string(), "gpu".to_string())]);
        let failures = [CapacityFailure {
            node: "a".into(),
            attempts: 7,
        }];
        let avoid = capacity_avoid(&CapacityMemory::default(), "g1", &failures, &nodes);
        let p = place(&gpu, 0, &nodes, &["a".into()], GRACE, None, &avoid);
        assert_eq!(p.nodes, vec!["a"], "kept: b does not match the selector");
        assert!(
            remember("g1", &avoid, &p).nodes.is_empty(),
            "nothing left, nothing to remember"
        );
        // A remembered node that no longer holds it gets nothing new either.
        let memory = CapacityMemory {
            generation: "g1".into(),
            nodes: BTreeMap::from([("a".to_string(), Some(100))]),
        };
        let avoid = capacity_avoid(&memory, "g1", &[], &nodes);
        let p = place(&gpu, 0, &nodes, &[], GRACE, None, &avoid);
        assert!(p.nodes.is_empty());
        assert_eq!(p.excluded[0], ("a".into(), Excluded::CapacityFailed));
    }

    #[test]
    fn the_memory_survives_a_bad_annotation() {
        assert_eq!(CapacityMemory::parse(Some("{not json")), CapacityMemory::default());
        let m = CapacityMemory {
            generation: "g".into(),
            nodes: BTreeMap::from([("a".to_string(), None)]),
        };
        let text = serde_json::to_string(&m).unwrap();
        assert_eq!(CapacityMemory::parse(Some(&text)), m);
    }

    const GRACE: Duration = Duration::from_secs(300);
    const NONE: BTreeMap<String, Option<u64>> = BTreeMap::new();
}
