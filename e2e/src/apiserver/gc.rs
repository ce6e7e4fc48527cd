//! The garbage collector: deletes objects whose owners are all gone, and
//! finishes foreground and orphan deletions (the `foregroundDeletion` and
//! `orphan` finalizers) as kube-controller-manager does.
//!
//! An ownerReference keeps its dependent only while an object with the same
//! API group, kind, name and uid exists: in the dependent's namespace for a
//! namespaced owner kind, cluster-wide for a cluster-scoped one. A reference
//! whose kind the server does not serve is never treated as dangling (the real
//! collector cannot resolve it and retries instead of deleting).

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::watch;

use super::store::{Propagation, Store, Sub};
use super::types::{split_api_version, ResourceType};

fn uid(o: &Value) -> &str {
    o["metadata"]["uid"].as_str().unwrap_or("")
}

fn owner_uids(o: &Value) -> Vec<&str> {
    o["metadata"]["ownerReferences"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["uid"].as_str())
        .collect()
}

fn has_finalizer(o: &Value, f: &str) -> bool {
    o["metadata"]["finalizers"]
        .as_array()
        .is_some_and(|a| a.iter().any(|x| x == f))
}

/// Identity of a live object as an ownerReference names it:
/// (group, kind, namespace, name, uid).
type Identity = (String, String, String, String, String);

fn identity(t: &ResourceType, o: &Value) -> Identity {
    (
        t.group.clone(),
        t.kind.clone(),
        o["metadata"]["namespace"].as_str().unwrap_or("").to_string(),
        o["metadata"]["name"].as_str().unwrap_or("").to_string(),
        uid(o).to_string(),
    )
}

/// Does `reference` (an ownerReference of `dependent`) point at a live object?
/// `None`: its kind is not served, so it cannot be judged.
fn owner_exists(store: &Store, live: &HashSet<Identity>, dependent: &Value, reference: &Value) -> Option<bool> {
    let api_version = reference["apiVersion"].as_str().unwrap_or("");
    let kind = reference["kind"].as_str().unwrap_or("");
    let (group, _) = split_api_version(api_version);
    let namespaced = store.with_registry(|r| {
        r.all()
            .find(|t| t.group == group && t.kind == kind)
            .map(|t| t.namespaced)
    })?;
    let namespace = if namespaced {
        dependent["metadata"]["namespace"].as_str().unwrap_or("")
    } else {
        ""
    };
    Some(live.contains(&(
        group.to_string(),
        kind.to_string(),
        namespace.to_string(),
        reference["name"].as_str().unwrap_or("").to_string(),
        reference["uid"].as_str().unwrap_or("").to_string(),
    )))
}

/// One pass over every object; returns how many writes it made.
pub fn collect_once(store: &Store) -> usize {
    let snapshot = store.snapshot();
    let live: HashSet<Identity> = snapshot.iter().map(|(t, o)| identity(t, o)).collect();
    let mut writes = 0;
    let ns_name = |o: &Value| {
        (
            o["metadata"]["namespace"].as_str().unwrap_or("").to_string(),
            o["metadata"]["name"].as_str().unwrap_or("").to_string(),
        )
    };
    for (t, owner) in snapshot
        .iter()
        .filter(|(_, o)| !o["metadata"]["deletionTimestamp"].is_null())
    {
        let owner_uid = uid(owner);
        let dependents: Vec<_> = snapshot
            .iter()
            .filter(|(_, o)| owner_uids(o).contains(&owner_uid))
            .collect();
        let (ns, name) = ns_name(owner);
        if has_finalizer(owner, "orphan") {
            for (dt, d) in &dependents {
                let (dns, dname) = ns_name(d);
                let _ = store.modify(dt, &dns, &dname, Sub::Main, |o| {
                    if let Some(refs) = o["metadata"]["ownerReferences"].as_array_mut() {
                        refs.retain(|r| r["uid"] != owner_uid);
                    }
                });
                writes += 1;
            }
            let _ = store.modify(t, &ns, &name, Sub::Main, |o| remove_finalizer(o, "orphan"));
            writes += 1;
        } else if has_finalizer(owner, "foregroundDeletion") {
            if dependents.is_empty() {
                let _ = store.modify(t, &ns, &name, Sub::Main, |o| remove_finalizer(o, "foregroundDeletion"));
                writes += 1;
            } else {
                for (dt, d) in dependents
                    .iter()
                    .filter(|(_, d)| d["metadata"]["deletionTimestamp"].is_null())
                {
                    let (dns, dname) = ns_name(d);
                    let _ = store.delete(dt, &dns, &dname, Some(Propagation::Foreground), false, None);
                    writes += 1;
                }
            }
        }
    }
    for (t, o) in &snapshot {
        let refs = o["metadata"]["ownerReferences"].as_array().cloned().unwrap_or_default();
        if refs.is_empty() || !o["metadata"]["deletionTimestamp"].is_null() {
            continue;
        }
        if refs.iter().all(|r| owner_exists(store, &live, o, r) == Some(false)) {
            let (ns, name) = ns_name(o);
            let _ = store.delete(t, &ns, &name, Some(Propagation::Background), false, None);
            writes += 1;
        }
    }
    writes
}

fn remove_finalizer(o: &mut Value, f: &str) {
    if let Some(a) = o["metadata"]["finalizers"].as_array_mut() {
        a.retain(|x| x != f);
        if a.is_empty() {
            o["metadata"]["finalizers"] = json!(null);
            if let Some(m) = o["metadata"].as_object_mut() {
                m.remove("finalizers");
            }
        }
    }
}

/// Runs a pass after every burst of changes, and every second regardless.
pub async fn run(store: Store, mut shutdown: watch::Receiver<bool>) {
    let mut rx = store.subscribe();
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            r = rx.recv() => {
                if matches!(r, Err(tokio::sync::broadcast::error::RecvError::Closed)) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                while rx.try_recv().is_ok() {}
            }
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let store = store.clone();
        // A pass writes through the store (which notifies this loop again);
        // passes converge because each removes what it acted on.
        let _ = tokio::task::spawn_blocking(move || collect_once(&store)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reference_with_the_wrong_name_is_dangling() {
        let s = Store::new(100);
        let t = s.resource_type("", "configmaps").unwrap();
        let p = s.create(&t, "default", json!({"metadata": {"name": "p"}})).unwrap();
        let uid = p["metadata"]["uid"].clone();
        s.create(&t, "default", json!({"metadata": {"name": "ok", "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "p", "uid": uid}]}}))
            .unwrap();
        s.create(&t, "default", json!({"metadata": {"name": "bad", "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "q", "uid": uid}]}}))
            .unwrap();
        collect_once(&s);
        assert!(s.get(&t, "default", "ok").is_ok());
        assert_eq!(s.get(&t, "default", "bad").unwrap_err().code, 404);
    }
}
