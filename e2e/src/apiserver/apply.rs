//! Server-side apply: field ownership per field manager, recorded in
//! `metadata.managedFields` as FieldsV1, conflicts when another manager owns a
//! field with a different value (unless `force`), and removal of fields a
//! manager applied before and no longer applies.
//!
//! Other writes (create, update, non-apply patches) record ownership too, as
//! operation `Update` ([`record_update`]): the writer owns what it added or
//! changed, taking it from others without conflict, so a later apply of such
//! a field by another manager conflicts with the writer.
//!
//! Lists merge as the type says. A custom resource's lists follow its CRD
//! schema: `x-kubernetes-list-type: map` merges elements by
//! `x-kubernetes-list-map-keys`, `set` merges scalar values, and anything else
//! (`atomic`, or no marker) is one field the applier replaces whole. Built-in
//! kinds (and every object's `metadata`) use the list keys of their Go types
//! (see [`list_merge_keys`]; `metadata.finalizers` is a set).

use std::collections::BTreeSet;

use serde_json::{json, Map, Value};

use super::patch::{list_merge_keys, same_key};

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Seg {
    /// A map field.
    F(String),
    /// An element of a keyed list, by its merge-key values (as JSON).
    K(String),
    /// A value of a set list (as JSON).
    V(String),
}

/// How a list merges.
#[derive(Clone, Debug, PartialEq)]
enum ListType {
    Atomic,
    Map(Vec<String>),
    Set,
}

/// Where list types come from at one place in an object: the built-in kinds'
/// field names, or a node of a CRD's structural schema (None: below what the
/// schema describes, where lists are atomic, as for any untyped value).
#[derive(Clone, Copy, Debug)]
pub enum Lists<'a> {
    ByFieldName,
    Schema(Option<&'a Value>),
}

impl<'a> Lists<'a> {
    /// For a whole object: its CRD schema, or the built-in list keys.
    pub fn root(schema: Option<&'a Value>) -> Self {
        match schema {
            Some(s) => Lists::Schema(Some(s)),
            None => Lists::ByFieldName,
        }
    }

    /// The value of field `k`; `metadata` at the top is always ObjectMeta.
    fn field(self, k: &str, top: bool) -> Self {
        match self {
            Lists::Schema(_) if top && k == "metadata" => Lists::ByFieldName,
            Lists::ByFieldName => Lists::ByFieldName,
            Lists::Schema(s) => Lists::Schema(s.and_then(|s| {
                s.get("properties")
                    .and_then(|p| p.get(k))
                    .or_else(|| s.get("additionalProperties").filter(|a| a.is_object()))
            })),
        }
    }

    /// Elements of the list this is.
    fn items(self) -> Self {
        match self {
            Lists::ByFieldName => Lists::ByFieldName,
            Lists::Schema(s) => Lists::Schema(s.and_then(|s| s.get("items"))),
        }
    }

    /// How the list this is (the value of field `k`) merges.
    fn list_type(self, k: &str) -> ListType {
        match self {
            Lists::ByFieldName if k == "finalizers" => ListType::Set,
            Lists::ByFieldName => match list_merge_keys(k) {
                Some(keys) => ListType::Map(keys.iter().map(|k| k.to_string()).collect()),
                None => ListType::Atomic,
            },
            Lists::Schema(s) => match s.and_then(|s| s["x-kubernetes-list-type"].as_str()) {
                Some("map") => ListType::Map(
                    s.and_then(|s| s["x-kubernetes-list-map-keys"].as_array())
                        .into_iter()
                        .flatten()
                        .filter_map(|k| k.as_str().map(String::from))
                        .collect(),
                ),
                Some("set") => ListType::Set,
                _ => ListType::Atomic,
            },
        }
    }
}

/// The list type of field `k` whose value is `v`, when `v` fits it: map lists
/// need objects with keys, sets need scalars; anything else is atomic.
fn list_type_of(lists: Lists, k: &str, v: &Value) -> ListType {
    let Value::Array(items) = v else {
        return ListType::Atomic;
    };
    match lists.list_type(k) {
        ListType::Map(keys) if !keys.is_empty() && items.iter().all(Value::is_object) => ListType::Map(keys),
        ListType::Set if items.iter().all(|i| !i.is_object() && !i.is_array()) => ListType::Set,
        _ => ListType::Atomic,
    }
}

type Path = Vec<Seg>;
type FieldSet = BTreeSet<Path>;

/// Metadata the server owns; appliers never own these.
const SYSTEM_METADATA: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "managedFields",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "selfLink",
];

fn key_json(keys: &[String], elem: &Value) -> String {
    let mut m = Map::new();
    for k in keys {
        if let Some(v) = elem.get(k) {
            m.insert(k.clone(), v.clone());
        }
    }
    Value::Object(m).to_string()
}

fn collect(v: &Value, path: &Path, lists: Lists, out: &mut FieldSet) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, child) in m {
                if path.is_empty() && (k == "apiVersion" || k == "kind") {
                    continue;
                }
                if path.len() == 1 && path[0] == Seg::F("metadata".into()) && SYSTEM_METADATA.contains(&k.as_str()) {
                    continue;
                }
                let mut p = path.clone();
                p.push(Seg::F(k.clone()));
                let child_lists = lists.field(k, path.is_empty());
                match (list_type_of(child_lists, k, child), child) {
                    (ListType::Map(keys), Value::Array(items)) => {
                        for item in items {
                            let mut ip = p.clone();
                            ip.push(Seg::K(key_json(&keys, item)));
                            out.insert(ip.clone());
                            collect(item, &ip, child_lists.items(), out);
                        }
                    }
                    (ListType::Set, Value::Array(items)) => {
                        for item in items {
                            let mut ip = p.clone();
                            ip.push(Seg::V(item.to_string()));
                            out.insert(ip);
                        }
                    }
                    _ => collect(child, &p, child_lists, out),
                }
            }
        }
        _ => {
            if !path.is_empty() {
                out.insert(path.clone());
            }
        }
    }
}

/// Fields set by an applied configuration, limited to `status` (status
/// subresource) or to everything but `status` (main endpoint of a type with one).
fn field_set(applied: &Value, scope: Scope, lists: Lists) -> FieldSet {
    let mut all = FieldSet::new();
    collect(applied, &Vec::new(), lists, &mut all);
    let status = Seg::F("status".into());
    all.into_iter()
        .filter(|p| match scope {
            Scope::All => true,
            Scope::Status => p.first() == Some(&status),
            Scope::NotStatus => p.first() != Some(&status),
        })
        .collect()
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Scope {
    All,
    Status,
    NotStatus,
}

fn get<'a>(v: &'a Value, path: &[Seg]) -> Option<&'a Value> {
    let mut cur = v;
    for seg in path {
        cur = match seg {
            Seg::F(f) => cur.get(f)?,
            Seg::K(k) => {
                let key: Value = serde_json::from_str(k).ok()?;
                let keys: Vec<&str> = key.as_object()?.keys().map(String::as_str).collect();
                cur.as_array()?.iter().find(|e| same_key(&keys, e, &key))?
            }
            Seg::V(v) => {
                let value: Value = serde_json::from_str(v).ok()?;
                cur.as_array()?.iter().find(|e| **e == value)?
            }
        };
    }
    Some(cur)
}

fn remove(v: &mut Value, path: &[Seg]) {
    let Some((last, parent)) = path.split_last() else {
        return;
    };
    let mut cur = v;
    for seg in parent {
        let next = match seg {
            Seg::F(f) => cur.get_mut(f),
            Seg::K(k) => {
                let Ok(key) = serde_json::from_str::<Value>(k) else {
                    return;
                };
                let keys: Vec<String> = key.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default();
                let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
                cur.as_array_mut()
                    .and_then(|a| a.iter_mut().find(|e| same_key(&keys, e, &key)))
            }
            // Set values are leaves: nothing is below one.
            Seg::V(_) => None,
        };
        let Some(next) = next else { return };
        cur = next;
    }
    match last {
        Seg::F(f) => {
            if let Some(m) = cur.as_object_mut() {
                m.remove(f);
            }
        }
        Seg::K(k) => {
            let Ok(key) = serde_json::from_str::<Value>(k) else {
                return;
            };
            let keys: Vec<String> = key.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default();
            let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
            if let Some(a) = cur.as_array_mut() {
                a.retain(|e| !same_key(&keys, e, &key));
            }
        }
        Seg::V(v) => {
            let Ok(value) = serde_json::from_str::<Value>(v) else {
                return;
            };
            if let Some(a) = cur.as_array_mut() {
                a.retain(|e| *e != value);
            }
        }
    }
}

/// Deep merge of an applied configuration: maps recursively, map lists by
/// key, set lists by value, everything else (atomic lists too) replaced.
fn merge(target: &mut Value, applied: &Value, lists: Lists, top: bool) {
    let (Value::Object(t), Value::Object(a)) = (&mut *target, applied) else {
        *target = applied.clone();
        return;
    };
    for (k, v) in a {
        let child_lists = lists.field(k, top);
        match (list_type_of(child_lists, k, v), v, t.get_mut(k)) {
            (ListType::Map(keys), Value::Array(items), Some(Value::Array(cur))) => {
                let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
                for item in items {
                    match cur.iter_mut().find(|c| same_key(&keys, c, item)) {
                        Some(c) => merge(c, item, child_lists.items(), false),
                        None => cur.push(item.clone()),
                    }
                }
            }
            (ListType::Set, Value::Array(items), Some(Value::Array(cur))) => {
                for item in items {
                    if !cur.contains(item) {
                        cur.push(item.clone());
                    }
                }
            }
            (_, Value::Object(_), Some(existing @ Value::Object(_))) => merge(existing, v, child_lists, false),
            _ => {
                t.insert(k.clone(), v.clone());
            }
        }
    }
}

fn encode(set: &FieldSet) -> Value {
    fn insert(node: &mut Map<String, Value>, path: &[Seg]) {
        let Some((first, rest)) = path.split_first() else {
            node.insert(".".into(), json!({}));
            return;
        };
        let key = match first {
            Seg::F(f) => format!("f:{f}"),
            Seg::K(k) => format!("k:{k}"),
            Seg::V(v) => format!("v:{v}"),
        };
        if let Value::Object(child) = node.entry(key).or_insert_with(|| json!({})) {
            insert(child, rest);
        }
    }
    let mut root = Map::new();
    for path in set {
        insert(&mut root, path);
    }
    Value::Object(root)
}

fn decode(v: &Value, path: &mut Path, out: &mut FieldSet) {
    let Some(m) = v.as_object() else { return };
    for (k, child) in m {
        if k == "." {
            out.insert(path.clone());
            continue;
        }
        let seg = if let Some(f) = k.strip_prefix("f:") {
            Seg::F(f.to_string())
        } else if let Some(key) = k.strip_prefix("k:") {
            Seg::K(key.to_string())
        } else if let Some(value) = k.strip_prefix("v:") {
            Seg::V(value.to_string())
        } else {
            continue;
        };
        path.push(seg);
        decode(child, path, out);
        path.pop();
    }
}

fn path_string(path: &Path) -> String {
    path.iter()
        .map(|s| match s {
            Seg::F(f) => format!(".{f}"),
            Seg::K(k) => format!("[{k}]"),
            Seg::V(v) => format!("[={v}]"),
        })
        .collect()
}

/// A field another manager owns with a different value.
#[derive(Debug, Clone)]
pub struct Conflict {
    pub manager: String,
    /// The owner's API version when it owns the field by an `Update`.
    pub using: Option<String>,
    pub field: String,
}

impl Conflict {
    /// `conflict with "m"` (an applier) or `conflict with "m" using v1` (an updater).
    pub fn owner(&self) -> String {
        match &self.using {
            Some(v) => format!("conflict with {:?} using {v}", self.manager),
            None => format!("conflict with {:?}", self.manager),
        }
    }
}

/// One managedFields entry, decoded.
struct Owner {
    manager: String,
    operation: String,
    subresource: String,
    api_version: String,
    set: FieldSet,
}

fn owners(entries: &[Value]) -> Vec<Owner> {
    entries
        .iter()
        .map(|e| {
            let mut set = FieldSet::new();
            decode(&e["fieldsV1"], &mut Vec::new(), &mut set);
            Owner {
                manager: e["manager"].as_str().unwrap_or("").to_string(),
                operation: e["operation"].as_str().unwrap_or("").to_string(),
                subresource: e["subresource"].as_str().unwrap_or("").to_string(),
                api_version: e["apiVersion"].as_str().unwrap_or("").to_string(),
                set,
            }
        })
        .collect()
}

fn subresource_of(scope: Scope) -> &'static str {
    if scope == Scope::Status {
        "status"
    } else {
        ""
    }
}

/// Records a non-apply write (operation `Update`) by `manager` in
/// `next.metadata.managedFields`: it owns the fields it added or changed
/// (taken from any other owner), and fields it removed leave every owner. A
/// write that changes no field leaves managedFields as they were. A client
/// that sends managedFields different from the stored ones sets them.
#[allow(clippy::too_many_arguments)]
pub fn record_update(
    current: &Value,
    next: &mut Value,
    manager: &str,
    scope: Scope,
    api_version: &str,
    now: &str,
    schema: Option<&Value>,
) {
    let lists = Lists::root(schema);
    let stored = &current["metadata"]["managedFields"];
    let sent = &next["metadata"]["managedFields"];
    let base: Vec<Value> = if sent.is_array() && sent != stored {
        sent
    } else {
        stored
    }
    .as_array()
    .cloned()
    .unwrap_or_default();
    let before = field_set(current, scope, lists);
    let after = field_set(next, scope, lists);
    let changed: FieldSet = after
        .iter()
        .filter(|p| !before.contains(*p) || (!matches!(p.last(), Some(Seg::K(_))) && get(current, p) != get(next, p)))
        .cloned()
        .collect();
    let removed: FieldSet = before.difference(&after).cloned().collect();
    if changed.is_empty() && removed.is_empty() {
        next["metadata"]["managedFields"] = if base.is_empty() {
            Value::Null
        } else {
            Value::Array(base)
        };
        if next["metadata"]["managedFields"].is_null() {
            if let Some(m) = next["metadata"].as_object_mut() {
                m.remove("managedFields");
            }
        }
        return;
    }
    let subresource = subresource_of(scope);
    let mut entries: Vec<Value> = Vec::new();
    let mut mine: Option<FieldSet> = None;
    for (e, o) in base.iter().zip(owners(&base)) {
        let is_mine = o.manager == manager && o.operation == "Update" && o.subresource == subresource;
        let kept: FieldSet = o
            .set
            .difference(&changed)
            .filter(|p| !removed.contains(*p))
            .cloned()
            .collect();
        if is_mine {
            mine = Some(kept);
            continue;
        }
        if kept.is_empty() && o.operation == "Update" {
            continue;
        }
        let mut e = e.clone();
        e["fieldsV1"] = encode(&kept);
        entries.push(e);
    }
    let mut set = mine.unwrap_or_default();
    set.extend(changed);
    if !set.is_empty() {
        let mut entry = json!({
            "manager": manager,
            "operation": "Update",
            "apiVersion": api_version,
            "time": now,
            "fieldsType": "FieldsV1",
            "fieldsV1": encode(&set),
        });
        if !subresource.is_empty() {
            entry["subresource"] = json!(subresource);
        }
        entries.push(entry);
    }
    next["metadata"]["managedFields"] = Value::Array(entries);
}

/// Applies `applied` to `live` for `manager`; on success returns the merged
/// object with its `metadata.managedFields` updated. `schema`: the CRD's
/// `openAPIV3Schema` (None for built-in kinds).
#[allow(clippy::too_many_arguments)]
pub fn server_side_apply(
    live: &Value,
    applied: &Value,
    manager: &str,
    force: bool,
    scope: Scope,
    now: &str,
    schema: Option<&Value>,
) -> Result<Value, Vec<Conflict>> {
    let lists = Lists::root(schema);
    let subresource = subresource_of(scope);
    let mut entries: Vec<Value> = live["metadata"]["managedFields"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let all = owners(&entries);
    let is_mine = |o: &Owner| o.manager == manager && o.operation == "Apply" && o.subresource == subresource;
    let new_set = field_set(applied, scope, lists);

    let mut conflicts = Vec::new();
    for other in all.iter().filter(|o| !is_mine(o)) {
        for p in new_set.intersection(&other.set) {
            let want = get(applied, p);
            if want.is_some_and(Value::is_object) {
                continue;
            }
            if get(live, p) != want {
                conflicts.push(Conflict {
                    manager: other.manager.clone(),
                    using: (other.operation == "Update").then(|| other.api_version.clone()),
                    field: path_string(p),
                });
            }
        }
    }
    if !conflicts.is_empty() && !force {
        return Err(conflicts);
    }

    let mine_before: FieldSet = all
        .iter()
        .find(|o| is_mine(o))
        .map(|o| o.set.clone())
        .unwrap_or_default();
    let owned_by_others: FieldSet = all
        .iter()
        .filter(|o| !is_mine(o))
        .flat_map(|o| o.set.iter().cloned())
        .collect();

    let mut out = live.clone();
    let dropped: FieldSet = mine_before
        .difference(&new_set)
        .filter(|p| !owned_by_others.contains(*p))
        .cloned()
        .collect();
    // A dropped list element goes with everything in it: removing its fields
    // first would lose the key it is found by.
    for p in &dropped {
        let inside_dropped = (1..p.len()).any(|n| dropped.contains(&p[..n]));
        if !inside_dropped {
            remove(&mut out, p);
        }
    }
    let mut scoped = applied.clone();
    if let Some(m) = scoped.as_object_mut() {
        m.remove("apiVersion");
        m.remove("kind");
        match scope {
            Scope::Status => m.retain(|k, _| k == "status"),
            Scope::NotStatus => {
                m.remove("status");
            }
            Scope::All => {}
        }
        if let Some(md) = m.get_mut("metadata").and_then(Value::as_object_mut) {
            md.retain(|k, _| !SYSTEM_METADATA.contains(&k.as_str()));
        }
    }
    merge(&mut out, &scoped, lists, true);

    // Ownership: mine becomes the new set; with force, others lose what I
    // took (an updater left with nothing leaves the list).
    entries.retain(|e| {
        !(e["manager"] == manager
            && e["operation"] == "Apply"
            && e["subresource"].as_str().unwrap_or("") == subresource)
    });
    if force {
        entries = entries
            .into_iter()
            .filter_map(|mut e| {
                let mut set = FieldSet::new();
                decode(&e["fieldsV1"], &mut Vec::new(), &mut set);
                let kept: FieldSet = set.difference(&new_set).cloned().collect();
                if kept.is_empty() && e["operation"] == "Update" {
                    return None;
                }
                e["fieldsV1"] = encode(&kept);
                Some(e)
            })
            .collect();
    }
    let mut mine = json!({
        "manager": manager,
        "operation": "Apply",
        "apiVersion": applied["apiVersion"].clone(),
        "time": now,
        "fieldsType": "FieldsV1",
        "fieldsV1": encode(&new_set),
    });
    if !subresource.is_empty() {
        mine["subresource"] = json!(subresource);
    }
    entries.push(mine);
    out["metadata"]["managedFields"] = Value::Array(entries);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(live: &Value, applied: Value, mgr: &str, force: bool) -> Result<Value, Vec<Conflict>> {
        server_side_apply(live, &applied, mgr, force, Scope::All, "t", None)
    }

    #[test]
    fn owners_conflict_and_force_takes_over() {
        let live = json!({"metadata": {"name": "x"}});
        let a = apply(
            &live,
            json!({"metadata": {"name": "x"}, "spec": {"a": 1, "b": 2}}),
            "alice",
            false,
        )
        .unwrap();
        // Same value: shared ownership, no conflict.
        let b = apply(&a, json!({"metadata": {"name": "x"}, "spec": {"a": 1}}), "bob", false).unwrap();
        let err = apply(&b, json!({"metadata": {"name": "x"}, "spec": {"b": 3}}), "bob", false).unwrap_err();
        assert_eq!(err[0].manager, "alice");
        assert_eq!(err[0].field, ".spec.b");
        let forced = apply(&b, json!({"metadata": {"name": "x"}, "spec": {"b": 3}}), "bob", true).unwrap();
        assert_eq!(forced["spec"]["b"], 3);
        // alice no longer owns b: her re-apply without b keeps bob's value.
        let again = apply(
            &forced,
            json!({"metadata": {"name": "x"}, "spec": {"a": 1}}),
            "alice",
            false,
        )
        .unwrap();
        assert_eq!(again["spec"], json!({"a": 1, "b": 3}));
    }

    #[test]
    fn fields_no_longer_applied_are_removed_unless_shared() {
        let live = json!({"metadata": {"name": "x"}});
        let a = apply(
            &live,
            json!({"metadata": {"name": "x", "labels": {"l1": "v", "l2": "v"}}}),
            "alice",
            false,
        )
        .unwrap();
        let a2 = apply(
            &a,
            json!({"metadata": {"name": "x", "labels": {"l1": "v"}}}),
            "alice",
            false,
        )
        .unwrap();
        assert_eq!(a2["metadata"]["labels"], json!({"l1": "v"}));
    }

    #[test]
    fn conditions_merge_by_type() {
        let live = json!({"metadata": {"name": "x"}, "status": {"conditions": [{"type": "A", "status": "True"}]}});
        let out = server_side_apply(
            &live,
            &json!({"status": {"conditions": [{"type": "B", "status": "False"}]}}),
            "m",
            false,
            Scope::Status,
            "t",
            None,
        )
        .unwrap();
        assert_eq!(out["status"]["conditions"].as_array().unwrap().len(), 2);
        assert_eq!(out["metadata"]["managedFields"][0]["subresource"], "status");
    }
}

#[cfg(test)]
mod list_tests {
    use super::*;

    #[test]
    fn map_lists_from_the_schema() {
        let schema = json!({"type": "object", "properties": {"spec": {"type": "object", "properties": {
            "targets": {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
                "items": {"type": "object", "properties": {"name": {"type": "string"}, "weight": {"type": "integer"}}}},
            "tags": {"type": "array", "x-kubernetes-list-type": "set", "items": {"type": "string"}},
            "containers": {"type": "array", "items": {"type": "object"}}}}}});
        let live = json!({"metadata": {"name": "g"}});
        let a = server_side_apply(&live, &json!({"apiVersion": "test.zerocopy.dev/v1", "kind": "Gadget", "metadata": {"name": "g"}, "spec": {"containers": [{"name": "a", "image": "x"}], "targets": [{"name": "t1", "weight": 1}], "tags": ["red"]}}), "alice", true, Scope::All, "t", Some(&schema)).unwrap();
        let b = server_side_apply(&a, &json!({"apiVersion": "test.zerocopy.dev/v1", "kind": "Gadget", "metadata": {"name": "g"}, "spec": {"targets": [{"name": "t2", "weight": 2}], "tags": ["blue"]}}), "bob", false, Scope::All, "t", Some(&schema)).unwrap();
        // bob drops his target: the whole element goes, key and all.
        let c = server_side_apply(&b, &json!({"apiVersion": "test.zerocopy.dev/v1", "kind": "Gadget", "metadata": {"name": "g"}, "spec": {"tags": ["blue"]}}), "bob", false, Scope::All, "t", Some(&schema)).unwrap();
        assert_eq!(c["spec"]["targets"], json!([{"name": "t1", "weight": 1}]));
        assert_eq!(
            b["spec"]["targets"],
            json!([{"name": "t1", "weight": 1}, {"name": "t2", "weight": 2}])
        );
    }
}
