//! PATCH bodies: JSON merge patch (RFC 7386), JSON patch (RFC 6902), and the
//! strategic merge patch of built-in kinds, with the list merge keys the
//! project's objects use.

use serde_json::{Map, Value};

/// Merge keys of lists that strategic merge and server-side apply merge per
/// element; every other list is replaced as a whole (atomic).
pub fn list_merge_keys(field: &str) -> Option<&'static [&'static str]> {
    Some(match field {
        "containers" | "initContainers" | "volumes" | "env" | "imagePullSecrets" => &["name"],
        "volumeMounts" => &["mountPath"],
        "ports" => &["containerPort"],
        "conditions" => &["type"],
        "ownerReferences" => &["uid"],
        _ => return None,
    })
}

/// Does `elem` have the same merge-key values as `other`?
pub fn same_key(keys: &[&str], elem: &Value, other: &Value) -> bool {
    keys.iter()
        .all(|k| elem.get(*k).is_some() && elem.get(*k) == other.get(*k))
}

pub fn json_merge(target: &mut Value, patch: &Value) {
    json_patch::merge(target, patch);
}

pub fn json_patch(target: &mut Value, patch: &Value) -> Result<(), String> {
    // As the real server (evanphx/json-patch): `test` for null passes on a missing path.
    let mut ops_json = patch
        .as_array()
        .cloned()
        .ok_or("invalid JSON patch: expected an array of operations")?;
    ops_json.retain(|op| {
        let missing = op["path"].as_str().is_some_and(|p| target.pointer(p).is_none());
        !(op["op"] == "test" && op["value"].is_null() && missing)
    });
    let ops: json_patch::Patch =
        serde_json::from_value(Value::Array(ops_json)).map_err(|e| format!("invalid JSON patch: {e}"))?;
    json_patch::patch(target, &ops).map_err(|e| format!("JSON patch failed: {e}"))
}

/// Strategic merge: maps merge recursively, `null` deletes, lists with a merge
/// key merge element by element (`$patch: delete` removes one), other lists
/// are replaced; `$setElementOrder`/`$retainKeys` directives are ignored.
pub fn strategic_merge(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if p.get("$patch").and_then(Value::as_str) == Some("replace") {
        let mut clean = p.clone();
        clean.remove("$patch");
        *target = Value::Object(clean);
        return;
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(t) = target else { return };
    for (k, v) in p {
        if k.starts_with('$') {
            continue;
        }
        if v.is_null() {
            t.remove(k);
            continue;
        }
        match (list_merge_keys(k), v) {
            (Some(keys), Value::Array(items)) => {
                let current = t.entry(k.clone()).or_insert_with(|| Value::Array(vec![]));
                if !current.is_array() {
                    *current = Value::Array(vec![]);
                }
                if let Value::Array(cur) = current {
                    merge_keyed_list(cur, items, keys);
                }
            }
            (_, Value::Object(_)) => strategic_merge(t.entry(k.clone()).or_insert(Value::Null), v),
            _ => {
                t.insert(k.clone(), v.clone());
            }
        }
    }
}

fn merge_keyed_list(cur: &mut Vec<Value>, items: &[Value], keys: &[&str]) {
    for item in items {
        let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
        match cur.iter().position(|c| same_key(keys, c, item)) {
            Some(i) if delete => {
                cur.remove(i);
            }
            Some(i) => strategic_merge(&mut cur[i], item),
            None if delete => {}
            None => {
                let mut fresh = Value::Null;
                strategic_merge(&mut fresh, item);
                cur.push(fresh);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strategic_merges_containers_by_name_and_replaces_other_lists() {
        let mut pod = json!({"spec": {"containers": [{"name": "a", "image": "x", "args": ["1"]}, {"name": "b", "image": "y"}],
                                      "tolerations": [{"key": "t"}]}});
        strategic_merge(
            &mut pod,
            &json!({"spec": {"containers": [{"name": "a", "image": "x2"}, {"name": "b", "$patch": "delete"}, {"name": "c", "image": "z"}],
                             "tolerations": [{"key": "u"}], "$setElementOrder/containers": [{"name": "a"}]}}),
        );
        assert_eq!(
            pod,
            json!({"spec": {"containers": [{"name": "a", "image": "x2", "args": ["1"]}, {"name": "c", "image": "z"}],
                            "tolerations": [{"key": "u"}]}})
        );
    }

    #[test]
    fn test_for_null_passes_on_a_missing_path() {
        let mut o = json!({"metadata": {}});
        json_patch(
            &mut o,
            &json!([{"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": ["f"]}]),
        )
        .unwrap();
        assert_eq!(o["metadata"]["finalizers"], json!(["f"]));
        assert!(json_patch(
            &mut o,
            &json!([{"op": "test", "path": "/metadata/finalizers", "value": null}])
        )
        .is_err());
    }

    #[test]
    fn merge_patch_null_deletes() {
        let mut o = json!({"metadata": {"labels": {"a": "1", "b": "2"}}});
        json_merge(&mut o, &json!({"metadata": {"labels": {"a": null}}}));
        assert_eq!(o, json!({"metadata": {"labels": {"b": "2"}}}));
    }
}
