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

use std::collections::BTreeMap;
use std::time::Duration;

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
    NoRoom { needed: u64, free: u64 },
    NoConsumer,
}

impl std::fmt::Display for Excluded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Excluded::SelectorMismatch => write!(f, "does not match nodeSelector"),
            Excluded::NotReady => write!(f, "node is not Ready"),
            Excluded::Unschedulable => write!(f, "node is cordoned"),
            Excluded::NoAgent => write!(f, "no live zerocopy agent (Lease missing or expired)"),
            Excluded::NoConsumer => write!(f, "no pod of the namespace consumes it there (placement: Consumers)"),
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
/// period after the last pod left).
pub fn place(
    selector: &BTreeMap<String, String>,
    bytes: u64,
    nodes: &[NodeInfo],
    current: &[String],
    grace: Duration,
    follow: Option<&Follow>,
) -> Placement {
    let mut sorted: Vec<&NodeInfo> = nodes.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut out = Placement::default();
    for n in sorted {
        let held = current.contains(&n.name);
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
        let p = place(&BTreeMap::new(), 0, &nodes, &["c".into()], GRACE, Some(&follow));
        assert_eq!(p.nodes, vec!["a", "b"], "the catalog of ml, and bert itself");
        assert_eq!(
            p.excluded,
            vec![("c".into(), Excluded::NoConsumer), ("d".into(), Excluded::NoConsumer)],
            "a node whose consumers left gives its copy back"
        );
        assert_eq!(place(&BTreeMap::new(), 0, &nodes, &[], GRACE, None).nodes.len(), 4);
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
        let p = place(&sel, 100, &nodes, &[], GRACE, None);
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
            place(&BTreeMap::new(), 0, &nodes, &[], GRACE, None).nodes,
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
        let p = place(&BTreeMap::new(), 400, &nodes, &[], GRACE, None);
        assert_eq!(p.nodes, vec!["n2", "n3"]);
        assert_eq!(
            p.excluded,
            vec![("n1".into(), Excluded::NoRoom { needed: 400, free: 100 })]
        );
        assert!(p.summary().starts_with("1 node(s) not enough room"), "{}", p.summary());
        // Already on n1 (its bytes are counted in used): it stays.
        assert_eq!(
            place(&BTreeMap::new(), 400, &nodes, &["n1".into()], GRACE, None).nodes,
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
        assert_eq!(place(&gpu, 0, &nodes, &[], GRACE, None).nodes, vec!["a"]);
        // Holding it on a does not keep a once the selector no longer matches.
        let moved = place(&cpu, 0, &nodes, &["a".into()], GRACE, None);
        assert_eq!(moved.nodes, vec!["b"]);
        assert_eq!(moved.excluded, vec![("a".into(), Excluded::SelectorMismatch)]);
    }

    #[test]
    fn nodes_appearing_and_disappearing_change_the_set() {
        let mut nodes = vec![node("a", &[], Some((None, 0)))];
        assert_eq!(place(&BTreeMap::new(), 0, &nodes, &[], GRACE, None).nodes, vec!["a"]);
        nodes.push(node("b", &[], Some((None, 0))));
        assert_eq!(
            place(&BTreeMap::new(), 0, &nodes, &["a".into()], GRACE, None).nodes,
            vec!["a", "b"]
        );
        nodes.push(node("c", &[], Some((None, 0))));
        nodes[0].schedulable = false;
        nodes[2].schedulable = false;
        // A cordon stops new copies but never wipes the one a node holds.
        let p = place(&BTreeMap::new(), 0, &nodes, &["a".into(), "b".into()], GRACE, None);
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
        let p = place(&BTreeMap::new(), 0, &nodes, &held, GRACE, None);
        assert_eq!(p.nodes, vec!["a", "b"]);
        assert_eq!(
            p.kept,
            vec![("a".into(), Excluded::NoAgent), ("b".into(), Excluded::NotReady)]
        );
        // Not placed there before: a down node gets nothing new.
        assert_eq!(
            place(&BTreeMap::new(), 0, &nodes, &[], GRACE, None).nodes,
            Vec::<String>::new()
        );
        // Past the grace period the copy moves.
        nodes[0].down_for = Some(GRACE);
        let p = place(&BTreeMap::new(), 0, &nodes, &held, GRACE, None);
        assert_eq!(p.nodes, vec!["b"]);
        assert_eq!(p.excluded, vec![("a".into(), Excluded::NoAgent)]);
    }

    const GRACE: Duration = Duration::from_secs(300);
}
