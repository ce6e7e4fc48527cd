//! The scheduler: binds pending pods to nodes that are Ready and schedulable,
//! match the pod's nodeSelector and required node affinity, and whose
//! NoSchedule/NoExecute taints the pod tolerates; among those, the node with
//! the fewest pods (then by name), so placement is deterministic.
//!
//! Not modelled: resource requests and allocatable, pod (anti-)affinity,
//! topology spread, preferred affinity, priorities and preemption.

use serde_json::{json, Value};
use std::collections::BTreeMap;
use tokio::sync::watch;

use super::events;
use crate::apiserver::store::{now, ListOptions, Store, Sub};

fn node_ready(node: &Value) -> bool {
    node["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

fn expression_matches(expr: &Value, labels: &Value) -> bool {
    let key = expr["key"].as_str().unwrap_or("");
    let value = labels.get(key).and_then(Value::as_str);
    let values: Vec<&str> = expr["values"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    match expr["operator"].as_str().unwrap_or("") {
        "In" => value.is_some_and(|v| values.contains(&v)),
        "NotIn" => value.is_none_or(|v| !values.contains(&v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" | "Lt" => {
            let (Some(v), Some(bound)) = (
                value.and_then(|v| v.parse::<i64>().ok()),
                values.first().and_then(|b| b.parse::<i64>().ok()),
            ) else {
                return false;
            };
            if expr["operator"] == "Gt" {
                v > bound
            } else {
                v < bound
            }
        }
        _ => false,
    }
}

fn tolerates(pod: &Value, taint: &Value) -> bool {
    pod["spec"]["tolerations"].as_array().into_iter().flatten().any(|t| {
        let effect_ok = t["effect"]
            .as_str()
            .is_none_or(|e| e.is_empty() || Some(e) == taint["effect"].as_str());
        let key_ok = match t["key"].as_str() {
            None | Some("") => t["operator"] == "Exists",
            Some(k) => Some(k) == taint["key"].as_str(),
        };
        let value_ok =
            t["operator"] == "Exists" || t["value"].as_str().unwrap_or("") == taint["value"].as_str().unwrap_or("");
        effect_ok && key_ok && value_ok
    })
}

/// Why `node` cannot run `pod`, or None when it can.
pub fn unfit_reason(pod: &Value, node: &Value) -> Option<&'static str> {
    let labels = &node["metadata"]["labels"];
    if !node_ready(node) {
        return Some("node(s) were not ready");
    }
    if node["spec"]["unschedulable"].as_bool().unwrap_or(false) {
        return Some("node(s) were unschedulable");
    }
    if let Some(sel) = pod["spec"]["nodeSelector"].as_object() {
        if sel.iter().any(|(k, v)| labels.get(k) != Some(v)) {
            return Some("node(s) didn't match Pod's node affinity/selector");
        }
    }
    let terms =
        &pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"];
    if let Some(terms) = terms.as_array() {
        let any = terms.iter().any(|term| {
            term["matchExpressions"]
                .as_array()
                .into_iter()
                .flatten()
                .all(|e| expression_matches(e, labels))
        });
        if !any {
            return Some("node(s) didn't match Pod's node affinity/selector");
        }
    }
    let untolerated = node["spec"]["taints"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| matches!(t["effect"].as_str(), Some("NoSchedule" | "NoExecute")))
        .any(|t| !tolerates(pod, t));
    if untolerated {
        return Some("node(s) had untolerated taint(s)");
    }
    None
}

/// The node to bind `pod` to, or the scheduler's "0/N nodes are available" message.
pub fn choose_node(pod: &Value, nodes: &[Value], pods_per_node: &BTreeMap<String, usize>) -> Result<String, String> {
    let mut reasons: BTreeMap<&str, usize> = BTreeMap::new();
    let mut fit: Vec<(usize, String)> = Vec::new();
    for n in nodes {
        let name = n["metadata"]["name"].as_str().unwrap_or("").to_string();
        match unfit_reason(pod, n) {
            Some(r) => *reasons.entry(r).or_default() += 1,
            None => fit.push((pods_per_node.get(&name).copied().unwrap_or(0), name)),
        }
    }
    fit.sort();
    match fit.into_iter().next() {
        Some((_, name)) => Ok(name),
        None => {
            let detail: Vec<String> = reasons.iter().map(|(r, n)| format!("{n} {r}")).collect();
            Err(format!("0/{} nodes are available: {}.", nodes.len(), detail.join(", ")))
        }
    }
}

/// One pass: tries to bind every pending, unbound pod.
pub fn schedule_once(store: &Store) {
    let (Ok(pods_t), Ok(nodes_t)) = (store.resource_type("", "pods"), store.resource_type("", "nodes")) else {
        return;
    };
    let Ok((pods, _, _)) = store.list(&pods_t, None, &ListOptions::default()) else {
        return;
    };
    let Ok((nodes, _, _)) = store.list(&nodes_t, None, &ListOptions::default()) else {
        return;
    };
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for p in &pods {
        if let Some(n) = p["spec"]["nodeName"].as_str().filter(|n| !n.is_empty()) {
            *per_node.entry(n.to_string()).or_default() += 1;
        }
    }
    for pod in pods.iter().filter(|p| {
        p["spec"]["nodeName"].as_str().unwrap_or("").is_empty() && p["metadata"]["deletionTimestamp"].is_null()
    }) {
        let ns = pod["metadata"]["namespace"].as_str().unwrap_or("");
        let name = pod["metadata"]["name"].as_str().unwrap_or("");
        match choose_node(pod, &nodes, &per_node) {
            Ok(node) => {
                *per_node.entry(node.clone()).or_default() += 1;
                let bound = store.modify(&pods_t, ns, name, Sub::Main, |p| p["spec"]["nodeName"] = json!(node));
                if bound.is_ok() {
                    let _ = store.modify(&pods_t, ns, name, Sub::Status, |p| {
                        set_condition(p, "PodScheduled", "True", "", "");
                    });
                    events::record(
                        store,
                        pod,
                        "Normal",
                        "Scheduled",
                        &format!("Successfully assigned {ns}/{name} to {node}"),
                        "default-scheduler",
                    );
                }
            }
            Err(message) => {
                let already = pod["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["type"] == "PodScheduled" && c["message"] == message.as_str());
                if !already {
                    let _ = store.modify(&pods_t, ns, name, Sub::Status, |p| {
                        set_condition(p, "PodScheduled", "False", "Unschedulable", &message);
                    });
                    events::record(store, pod, "Warning", "FailedScheduling", &message, "default-scheduler");
                }
            }
        }
    }
}

/// Sets a pod condition by type, keeping lastTransitionTime when the status is unchanged.
pub fn set_condition(pod: &mut Value, type_: &str, status: &str, reason: &str, message: &str) {
    if !pod["status"]["conditions"].is_array() {
        pod["status"]["conditions"] = json!([]);
    }
    let Some(conds) = pod["status"]["conditions"].as_array_mut() else {
        return;
    };
    let mut c = json!({"type": type_, "status": status, "lastTransitionTime": now()});
    if !reason.is_empty() {
        c["reason"] = json!(reason);
        c["message"] = json!(message);
    }
    match conds.iter_mut().find(|x| x["type"] == type_) {
        Some(existing) if existing["status"] == status => {
            c["lastTransitionTime"] = existing["lastTransitionTime"].clone();
            *existing = c;
        }
        Some(existing) => *existing = c,
        None => conds.push(c),
    }
}

pub async fn run(store: Store, shutdown: watch::Receiver<bool>) {
    super::run_on_changes(store, shutdown, schedule_once).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, labels: Value, taints: Value, ready: bool) -> Value {
        json!({"metadata": {"name": name, "labels": labels}, "spec": {"taints": taints},
               "status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}})
    }

    #[test]
    fn selectors_affinity_and_taints() {
        let nodes = vec![
            node("a", json!({"zone": "1", "gpu": "yes"}), json!([]), true),
            node(
                "b",
                json!({"zone": "2"}),
                json!([{"key": "dedicated", "value": "ray", "effect": "NoSchedule"}]),
                true,
            ),
            node("c", json!({"zone": "3"}), json!([]), false),
        ];
        let none = BTreeMap::new();
        let pod = |spec: Value| json!({"spec": spec});
        assert_eq!(
            choose_node(&pod(json!({"nodeSelector": {"zone": "1"}})), &nodes, &none).unwrap(),
            "a"
        );
        let err = choose_node(&pod(json!({"nodeSelector": {"zone": "2"}})), &nodes, &none).unwrap_err();
        assert_eq!(
            err,
            "0/3 nodes are available: 1 node(s) didn't match Pod's node affinity/selector, 1 node(s) had untolerated taint(s), 1 node(s) were not ready."
        );
        let tolerant = pod(
            json!({"nodeSelector": {"zone": "2"}, "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ray", "effect": "NoSchedule"}]}),
        );
        assert_eq!(choose_node(&tolerant, &nodes, &none).unwrap(), "b");
        let affinity = |op: &str, values: Value| {
            pod(
                json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "gpu", "operator": op, "values": values}]}]}}}}),
            )
        };
        assert_eq!(
            choose_node(&affinity("In", json!(["yes"])), &nodes, &none).unwrap(),
            "a"
        );
        assert_eq!(choose_node(&affinity("Exists", json!([])), &nodes, &none).unwrap(), "a");
        assert!(
            choose_node(&affinity("DoesNotExist", json!([])), &nodes, &none).is_err(),
            "b is tainted, c not ready"
        );
        assert!(choose_node(&affinity("NotIn", json!(["yes"])), &nodes, &none).is_err());
    }

    #[test]
    fn spreads_by_pod_count() {
        let nodes = vec![
            node("a", json!({}), json!([]), true),
            node("b", json!({}), json!([]), true),
        ];
        let counts = BTreeMap::from([("a".to_string(), 2usize)]);
        assert_eq!(choose_node(&json!({"spec": {}}), &nodes, &counts).unwrap(), "b");
    }
}
