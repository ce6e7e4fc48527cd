//! Placement: which nodes hold a ModelWrapper. A pure function over a
//! snapshot of nodes and agents, so every rule is unit-tested.
//!
//! A node is chosen when it matches `nodeSelector`, is Ready and schedulable,
//! runs a live agent (an unexpired Lease), and has room in the agent's
//! capacity for the wrapper's bytes. A node that already holds the wrapper
//! keeps it without a room check (its bytes are already in `used`). When room
//! is short the choice is deterministic: nodes in name order. Every node left
//! out gets a reason.

use std::collections::BTreeMap;

/// What placement needs to know about one node.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeInfo {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub ready: bool,
    pub schedulable: bool,
    /// The node's agent, when its Lease is live.
    pub agent: Option<AgentInfo>,
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
}

impl std::fmt::Display for Excluded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Excluded::SelectorMismatch => write!(f, "does not match nodeSelector"),
            Excluded::NotReady => write!(f, "node is not Ready"),
            Excluded::Unschedulable => write!(f, "node is cordoned"),
            Excluded::NoAgent => write!(f, "no live zerocopy agent (Lease missing or expired)"),
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
    /// Chosen nodes, in name order.
    pub nodes: Vec<String>,
    /// Every node left out, with its reason, in name order.
    pub excluded: Vec<(String, Excluded)>,
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
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Places a wrapper of `bytes` (0 when not known yet) with `selector`;
/// `current` are the nodes that already hold it.
pub fn place(selector: &BTreeMap<String, String>, bytes: u64, nodes: &[NodeInfo], current: &[String]) -> Placement {
    let mut sorted: Vec<&NodeInfo> = nodes.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut out = Placement::default();
    for n in sorted {
        let why = if selector.iter().any(|(k, v)| n.labels.get(k) != Some(v)) {
            Some(Excluded::SelectorMismatch)
        } else if !n.ready {
            Some(Excluded::NotReady)
        } else if !n.schedulable {
            Some(Excluded::Unschedulable)
        } else {
            match n.agent {
                None => Some(Excluded::NoAgent),
                Some(AgentInfo {
                    capacity: Some(cap),
                    used,
                }) if !current.contains(&n.name) => {
                    let free = cap.saturating_sub(used);
                    (bytes > free).then_some(Excluded::NoRoom { needed: bytes, free })
                }
                Some(_) => None,
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
            agent: agent.map(|(capacity, used)| AgentInfo { capacity, used }),
        }
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
        let p = place(&sel, 100, &nodes, &[]);
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
        assert_eq!(place(&BTreeMap::new(), 0, &nodes, &[]).nodes, vec!["a", "b", "c"]);
    }

    #[test]
    fn capacity_shortfall_is_deterministic_and_sticky() {
        let nodes = vec![
            node("n2", &[], Some((Some(1000), 500))),
            node("n1", &[], Some((Some(1000), 900))),
            node("n3", &[], Some((Some(1000), 0))),
        ];
        let p = place(&BTreeMap::new(), 400, &nodes, &[]);
        assert_eq!(p.nodes, vec!["n2", "n3"]);
        assert_eq!(
            p.excluded,
            vec![("n1".into(), Excluded::NoRoom { needed: 400, free: 100 })]
        );
        assert!(p.summary().starts_with("1 node(s) not enough room"), "{}", p.summary());
        // Already on n1 (its bytes are counted in used): it stays.
        assert_eq!(
            place(&BTreeMap::new(), 400, &nodes, &["n1".into()]).nodes,
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
        assert_eq!(place(&gpu, 0, &nodes, &[]).nodes, vec!["a"]);
        // Holding it on a does not keep a once the selector no longer matches.
        let moved = place(&cpu, 0, &nodes, &["a".into()]);
        assert_eq!(moved.nodes, vec!["b"]);
        assert_eq!(moved.excluded, vec![("a".into(), Excluded::SelectorMismatch)]);
    }

    #[test]
    fn nodes_appearing_and_disappearing_change_the_set() {
        let mut nodes = vec![node("a", &[], Some((None, 0)))];
        assert_eq!(place(&BTreeMap::new(), 0, &nodes, &[]).nodes, vec!["a"]);
        nodes.push(node("b", &[], Some((None, 0))));
        assert_eq!(place(&BTreeMap::new(), 0, &nodes, &["a".into()]).nodes, vec!["a", "b"]);
        nodes[0].schedulable = false;
        let p = place(&BTreeMap::new(), 0, &nodes, &["a".into(), "b".into()]);
        assert_eq!(p.nodes, vec!["b"]);
        assert_eq!(p.excluded, vec![("a".into(), Excluded::Unschedulable)]);
    }
}
