//! ModelWrapper status from its replicas: pure, so the aggregation rules are
//! unit-tested. Messages are stable (no counts of bytes in flight, no times),
//! so a status write happens only when something a user cares about changed.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use zerocopy_api::quantity::HumanBytes;
use zerocopy_api::{ModelReplica, ModelWrapperStatus, ReplicaPhase};

use crate::placement::Placement;

/// Sets a condition by type; keeps `lastTransitionTime` when the status did not change.
pub fn set_condition(conditions: &mut Vec<Condition>, mut c: Condition) {
    match conditions.iter_mut().find(|x| x.type_ == c.type_) {
        Some(existing) => {
            if existing.status == c.status {
                c.last_transition_time = existing.last_transition_time.clone();
            }
            *existing = c;
        }
        None => conditions.push(c),
    }
}

pub fn condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    Condition {
        type_: type_.into(),
        status: if status { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: now.clone(),
    }
}

/// The phase and per-state node lists of one wrapper.
#[derive(Debug, Default, PartialEq)]
pub struct Tally {
    pub ready: Vec<String>,
    pub filling: Vec<String>,
    pub failed: Vec<(String, String)>,
    /// Nodes among `failed` whose reason is lack of capacity.
    pub capacity_failed: Vec<String>,
    pub total_bytes: u64,
}

/// Counts replicas of the wanted `generation` on the `desired` nodes: one
/// pass over the replicas, then one lookup per node.
pub fn tally(desired: &[String], generation: &str, replicas: &[ModelReplica]) -> Tally {
    let mut t = Tally::default();
    let mut by_node: std::collections::HashMap<&str, &ModelReplica> = std::collections::HashMap::new();
    for r in replicas.iter().filter(|r| r.spec.generation == generation) {
        by_node.entry(r.spec.node.as_str()).or_insert(r);
    }
    for node in desired {
        let r = by_node.get(node.as_str());
        let status = r.and_then(|r| r.status.clone()).unwrap_or_default();
        let current = status.generation.as_deref() == Some(generation);
        match status.phase {
            ReplicaPhase::Ready if current => {
                t.ready.push(node.clone());
                t.total_bytes = t.total_bytes.max(status.bytes_total);
            }
            ReplicaPhase::Failed if current => {
                if status.reason.as_deref() == Some(crate::placement::CAPACITY_REASON) {
                    t.capacity_failed.push(node.clone());
                }
                t.failed.push((
                    node.clone(),
                    status.message.clone().unwrap_or_else(|| "fill failed".into()),
                ));
            }
            _ => {
                t.filling.push(node.clone());
                t.total_bytes = t.total_bytes.max(status.bytes_total);
            }
        }
    }
    t
}

/// The status to write, given the previous one (for transition times).
pub fn aggregate(
    previous: Option<&ModelWrapperStatus>,
    generation: Option<i64>,
    digest: &str,
    ready_label: &str,
    placement: &Placement,
    replicas: &[ModelReplica],
    now: &Time,
) -> ModelWrapperStatus {
    let t = tally(&placement.nodes, digest, replicas);
    let desired = placement.nodes.len() as u32;
    let mut conditions = previous.map(|p| p.conditions.clone()).unwrap_or_default();
    let phase;
    if desired == 0 {
        phase = "Pending";
        let why = if placement.excluded.is_empty() {
            "no nodes in the cluster".to_string()
        } else {
            placement.summary()
        };
        set_condition(
            &mut conditions,
            condition(
                "Ready",
                false,
                "NoEligibleNodes",
                format!("no node can hold this wrapper: {why}"),
                generation,
                now,
            ),
        );
        set_condition(
            &mut conditions,
            condition(
                "Progressing",
                false,
                "NoEligibleNodes",
                "waiting for an eligible node".into(),
                generation,
                now,
            ),
        );
        set_condition(
            &mut conditions,
            condition("Degraded", false, "NoEligibleNodes", String::new(), generation, now),
        );
    } else {
        let all_ready = t.ready.len() as u32 == desired;
        phase = if all_ready {
            "Ready"
        } else if !t.failed.is_empty() && t.ready.is_empty() && t.filling.is_empty() {
            "Failed"
        } else if !t.failed.is_empty() {
            "Degraded"
        } else {
            "Filling"
        };
        let ready_msg = if all_ready {
            format!("ready on {desired}/{desired} nodes")
        } else {
            format!("ready on {}/{desired} nodes", t.ready.len())
        };
        set_condition(
            &mut conditions,
            condition(
                "Ready",
                all_ready,
                if all_ready { "AllNodesReady" } else { "NodesNotReady" },
                ready_msg,
                generation,
                now,
            ),
        );
        let progressing = !t.filling.is_empty();
        set_condition(
            &mut conditions,
            condition(
                "Progressing",
                progressing,
                if progressing { "Filling" } else { "Settled" },
                if progressing {
                    format!("filling on {}", t.filling.join(", "))
                } else {
                    String::new()
                },
                generation,
                now,
            ),
        );
        // Nodes that keep their copy while down or cordoned are degraded
        // capacity, not failures: say so, with stable text.
        let degraded = !t.failed.is_empty() || !placement.kept.is_empty();
        // Left for lack of capacity and placed elsewhere: healthy, but say where it is not.
        let moved: Vec<&str> = placement
            .excluded
            .iter()
            .filter(|(_, why)| *why == crate::placement::Excluded::CapacityFailed)
            .map(|(n, _)| n.as_str())
            .collect();
        let reason = if !t.failed.is_empty() && t.capacity_failed.len() == t.failed.len() {
            // Failing for room where nothing else can hold it (else it would have moved).
            "InsufficientCapacity"
        } else if !t.failed.is_empty() {
            "FillFailed"
        } else if !placement.kept.is_empty() {
            "NodesUnavailable"
        } else if !moved.is_empty() {
            "MovedForCapacity"
        } else {
            "Healthy"
        };
        let message = t
            .failed
            .iter()
            .map(|(n, m)| format!("{n}: {m}"))
            .chain(
                placement
                    .kept
                    .iter()
                    .map(|(n, why)| format!("{n} keeps its copy: {why}")),
            )
            .chain((!moved.is_empty()).then(|| {
                let more = if moved.len() > 5 {
                    format!(" and {} more", moved.len() - 5)
                } else {
                    String::new()
                };
                format!(
                    "left {}{more} after {} fills failed there for lack of capacity",
                    moved[..moved.len().min(5)].join(", "),
                    crate::placement::CAPACITY_FAILURES_TO_MOVE
                )
            }))
            .collect::<Vec<_>>()
            .join("; ");
        set_condition(
            &mut conditions,
            condition("Degraded", degraded, reason, message, generation, now),
        );
    }
    ModelWrapperStatus {
        phase: Some(phase.into()),
        observed_generation: generation,
        desired_nodes: desired,
        ready_nodes: t.ready.len() as u32,
        total_bytes: t.total_bytes,
        size: (t.total_bytes > 0).then(|| HumanBytes(t.total_bytes).to_string()),
        digest: Some(digest.into()),
        ready_label: Some(ready_label.into()),
        conditions,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerocopy_api::replica::{ModelReplicaSpec, ModelReplicaStatus};
    use zerocopy_api::spec::{ComponentSpec, PipelineSpec, SourceSpec};

    fn replica(node: &str, gen: &str, phase: ReplicaPhase, status_gen: &str) -> ModelReplica {
        let mut r = ModelReplica::new(
            &format!("w.{node}"),
            ModelReplicaSpec {
                wrapper: "w".into(),
                node: node.into(),
                generation: gen.into(),
                mode: Default::default(),
                pipeline: PipelineSpec {
                    components: vec![ComponentSpec {
                        name: "m".into(),
                        weights: Some(SourceSpec {
                            uri: "file:///m".into(),
                            sha256: None,
                        }),
                        source: None,
                        skeleton: None,
                    }],
                    skeleton: None,
                },
                memory: Default::default(),
            },
        );
        r.status = Some(ModelReplicaStatus {
            phase,
            bytes_total: 1 << 30,
            generation: Some(status_gen.into()),
            message: (phase == ReplicaPhase::Failed).then(|| "sha256 mismatch".into()),
            ..Default::default()
        });
        r
    }

    fn placement(nodes: &[&str]) -> Placement {
        Placement {
            nodes: nodes.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn now() -> Time {
        Time(k8s_openapi::jiff::Timestamp::now())
    }

    #[test]
    fn ready_when_every_desired_node_has_the_current_generation() {
        let reps = vec![
            replica("a", "g1", ReplicaPhase::Ready, "g1"),
            replica("b", "g1", ReplicaPhase::Ready, "g1"),
        ];
        let s = aggregate(
            None,
            Some(1),
            "g1",
            "ready.zerocopy.dev/ns.w",
            &placement(&["a", "b"]),
            &reps,
            &now(),
        );
        assert_eq!(s.phase.as_deref(), Some("Ready"));
        assert_eq!((s.ready_nodes, s.desired_nodes), (2, 2));
        assert_eq!(s.size.as_deref(), Some("1.0 GiB"));
        assert_eq!(
            s.conditions.iter().find(|c| c.type_ == "Ready").unwrap().message,
            "ready on 2/2 nodes"
        );
    }

    #[test]
    fn a_new_generation_is_filling_until_its_replicas_report_it() {
        // Replica spec moved to g2, status still describes g1 Ready.
        let reps = vec![replica("a", "g2", ReplicaPhase::Ready, "g1")];
        let s = aggregate(None, Some(2), "g2", "l", &placement(&["a"]), &reps, &now());
        assert_eq!(s.phase.as_deref(), Some("Filling"));
        assert_eq!(s.ready_nodes, 0);
    }

    #[test]
    fn failures_degrade_or_fail() {
        let reps = vec![
            replica("a", "g", ReplicaPhase::Ready, "g"),
            replica("b", "g", ReplicaPhase::Failed, "g"),
        ];
        let s = aggregate(None, Some(1), "g", "l", &placement(&["a", "b"]), &reps, &now());
        assert_eq!(s.phase.as_deref(), Some("Degraded"));
        let d = s.conditions.iter().find(|c| c.type_ == "Degraded").unwrap();
        assert_eq!((d.status.as_str(), d.message.as_str()), ("True", "b: sha256 mismatch"));
        let s = aggregate(None, Some(1), "g", "l", &placement(&["b"]), &reps[1..], &now());
        assert_eq!(s.phase.as_deref(), Some("Failed"));
    }

    #[test]
    fn capacity_failures_say_so() {
        let mut full = replica("b", "g", ReplicaPhase::Failed, "g");
        if let Some(s) = full.status.as_mut() {
            s.reason = Some("InsufficientCapacity".into());
            s.message = Some("ml/w: needs 1.0 MiB but only 64.0 KiB of the 64.0 KiB capacity is free".into());
        }
        // Nowhere else to go: kept, and Degraded says why with the agent's numbers.
        let s = aggregate(None, Some(1), "g", "l", &placement(&["b"]), &[full], &now());
        let d = s.conditions.iter().find(|c| c.type_ == "Degraded").unwrap();
        assert_eq!((d.status.as_str(), d.reason.as_str()), ("True", "InsufficientCapacity"));
        assert!(d.message.starts_with("b: ml/w: needs 1.0 MiB"), "{}", d.message);
        // Moved: Ready elsewhere, and the condition names the node it left.
        let p = Placement {
            nodes: vec!["a".into()],
            excluded: vec![("b".into(), crate::placement::Excluded::CapacityFailed)],
            ..Default::default()
        };
        let reps = vec![replica("a", "g", ReplicaPhase::Ready, "g")];
        let s = aggregate(None, Some(1), "g", "l", &p, &reps, &now());
        assert_eq!(s.phase.as_deref(), Some("Ready"));
        let d = s.conditions.iter().find(|c| c.type_ == "Degraded").unwrap();
        assert_eq!((d.status.as_str(), d.reason.as_str()), ("False", "MovedForCapacity"));
        assert_eq!(d.message, "left b after 3 fills failed there for lack of capacity");
    }

    #[test]
    fn no_eligible_node_is_pending_with_the_reasons() {
        let p = Placement {
            nodes: vec![],
            excluded: vec![("x".into(), crate::placement::Excluded::NoAgent)],
            ..Default::default()
        };
        let s = aggregate(None, Some(1), "g", "l", &p, &[], &now());
        assert_eq!(s.phase.as_deref(), Some("Pending"));
        let r = s.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
        assert!(r.message.contains("no live zerocopy agent"), "{}", r.message);
    }

    #[test]
    fn transition_times_survive_unchanged_statuses() {
        let reps = vec![replica("a", "g", ReplicaPhase::Ready, "g")];
        let first = aggregate(
            None,
            Some(1),
            "g",
            "l",
            &placement(&["a"]),
            &reps,
            &Time(
                k8s_openapi::jiff::Timestamp::now()
                    .checked_sub(k8s_openapi::jiff::SignedDuration::from_hours(1))
                    .unwrap(),
            ),
        );
        let second = aggregate(Some(&first), Some(1), "g", "l", &placement(&["a"]), &reps, &now());
        assert_eq!(first, second, "same inputs, same status: no write");
    }
}
