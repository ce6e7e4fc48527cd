//! The object store: one monotonically increasing resourceVersion, objects by
//! (type, namespace, name), a bounded event history that watches resume from
//! (older versions answer 410 Gone), and the write semantics clients rely on:
//! optimistic concurrency, generation, status subresource, finalizers and
//! graceful deletion of pods bound to a node.

use super::admission::{self, AdmissionRequest, Operation};
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{json, Value};
use tokio::sync::broadcast;

use super::apply::{record_update, server_side_apply, Scope};
use super::error::ApiError;
use super::patch;
use super::schema;
use super::selector::{FieldSelector, LabelSelector};
use super::types::{Registry, ResourceType, TypeKey};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Added,
    Modified,
    Deleted,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Added => "ADDED",
            EventKind::Modified => "MODIFIED",
            EventKind::Deleted => "DELETED",
        }
    }
}

/// One committed change.
#[derive(Debug)]
pub struct Event {
    pub rv: u64,
    pub type_key: TypeKey,
    pub kind: EventKind,
    pub object: Value,
    /// The object before a modification, so filtered watches can turn a
    /// change that leaves their selector into DELETED.
    pub old: Option<Value>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PatchKind {
    Merge,
    Json,
    Strategic,
    Apply,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Propagation {
    Background,
    Foreground,
    Orphan,
}

/// Which part of an object a write may change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sub {
    Main,
    Status,
}

#[derive(Clone, Debug, Default)]
pub struct ListOptions {
    pub labels: LabelSelector,
    pub fields: FieldSelector,
    pub limit: Option<usize>,
    pub continue_token: Option<String>,
}

impl ListOptions {
    pub fn matches(&self, obj: &Value) -> bool {
        self.labels.matches(&obj["metadata"]["labels"]) && self.fields.matches(obj)
    }
}

type ObjKey = (String, String);

struct Inner {
    rv: u64,
    registry: Registry,
    objects: BTreeMap<TypeKey, BTreeMap<ObjKey, Value>>,
    history: VecDeque<Arc<Event>>,
    /// Every event up to and including this version has left the history.
    compacted: u64,
    history_limit: usize,
}

/// Shared handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Mutex<Inner>>,
    events: broadcast::Sender<Arc<Event>>,
}

pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> &'a str {
    obj["metadata"][field].as_str().unwrap_or("")
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name.chars().last().is_some_and(|c| c.is_ascii_alphanumeric())
}

/// The object without metadata and status: what `generation` counts changes of.
fn spec_part(obj: &Value) -> Value {
    let mut o = obj.clone();
    if let Some(m) = o.as_object_mut() {
        m.remove("metadata");
        m.remove("status");
    }
    o
}

impl Store {
    pub fn new(history_limit: usize) -> Self {
        let (events, _) = broadcast::channel(16384);
        let mut s = Inner {
            rv: 1,
            registry: Registry::with_builtins(),
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            compacted: 1,
            history_limit,
        };
        for ns in ["default", "kube-system", "kube-node-lease", "kube-public"] {
            let obj = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}, "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}});
            let t = (String::new(), "namespaces".to_string());
            s.rv += 1;
            let mut obj = obj;
            stamp_new(&mut obj, s.rv, true);
            s.objects.entry(t).or_default().insert((String::new(), ns.into()), obj);
        }
        s.compacted = s.rv;
        Store {
            inner: Arc::new(Mutex::new(s)),
            events,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock poisons it; the data is still consistent
        // because every write commits in one step, so keep serving.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn current_rv(&self) -> u64 {
        self.lock().rv
    }

    pub fn with_registry<R>(&self, f: impl FnOnce(&Registry) -> R) -> R {
        f(&self.lock().registry)
    }

    pub fn resource_type(&self, group: &str, plural: &str) -> Result<ResourceType, ApiError> {
        self.lock().registry.get(group, plural).cloned().ok_or_else(|| {
            ApiError::new(
                404,
                "NotFound",
                format!("the server could not find the requested resource ({group}/{plural})"),
            )
        })
    }

    pub fn get(&self, t: &ResourceType, ns: &str, name: &str) -> Result<Value, ApiError> {
        lookup(&self.lock(), t, ns, name)
    }

    /// Objects of a type (in one namespace, or all when `ns` is None), the
    /// list's resourceVersion, and a continue token when `limit` cut it.
    pub fn list(
        &self,
        t: &ResourceType,
        ns: Option<&str>,
        opts: &ListOptions,
    ) -> Result<(Vec<Value>, u64, Option<String>), ApiError> {
        let inner = self.lock();
        let start: Option<ObjKey> = match &opts.continue_token {
            Some(tok) => Some(decode_continue(tok)?),
            None => None,
        };
        let mut items = Vec::new();
        let mut next = None;
        if let Some(objs) = inner.objects.get(&t.key()) {
            for (key, obj) in objs {
                if start.as_ref().is_some_and(|s| key <= s) {
                    continue;
                }
                if ns.is_some_and(|n| key.0 != n) || !opts.matches(obj) {
                    continue;
                }
                if opts.limit.is_some_and(|l| l > 0 && items.len() == l) {
                    next = Some(encode_continue(&items_last_key(&items)));
                    break;
                }
                items.push(obj.clone());
            }
        }
        Ok((items, inner.rv, next))
    }

    /// Events after `since` (None: the current objects as ADDED) plus a
    /// receiver for everything later, taken atomically so nothing is missed.
    #[allow(clippy::type_complexity)]
    pub fn watch(
        &self,
        t: &ResourceType,
        since: Option<u64>,
    ) -> Result<(Vec<Arc<Event>>, u64, broadcast::Receiver<Arc<Event>>), ApiError> {
        let inner = self.lock();
        let rx = self.events.subscribe();
        let key = t.key();
        let initial = match since {
            None => inner
                .objects
                .get(&key)
                .into_iter()
                .flat_map(|m| m.values())
                .map(|o| {
                    Arc::new(Event {
                        rv: inner.rv,
                        type_key: key.clone(),
                        kind: EventKind::Added,
                        object: o.clone(),
                        old: None,
                    })
                })
                .collect(),
            Some(rv) if rv < inner.compacted => {
                return Err(ApiError::gone(format!(
                    "too old resource version: {rv} ({})",
                    inner.compacted + 1
                )))
            }
            Some(rv) => inner
                .history
                .iter()
                .filter(|e| e.rv > rv && e.type_key == key)
                .cloned()
                .collect(),
        };
        Ok((initial, inner.rv, rx))
    }

    /// Creates an object without recording a field manager (the simulator's
    /// own controllers, and apply, which records its own).
    pub fn create(&self, t: &ResourceType, ns: &str, obj: Value) -> Result<Value, ApiError> {
        self.create_by(t, ns, obj, None)
    }

    /// POST: creates an object; `manager` (when given) owns its fields, as
    /// operation `Update` in managedFields.
    pub fn create_by(
        &self,
        t: &ResourceType,
        ns: &str,
        mut obj: Value,
        manager: Option<&str>,
    ) -> Result<Value, ApiError> {
        let mut inner = self.lock();
        if obj["metadata"]["name"].as_str().unwrap_or("").is_empty() {
            let prefix = obj["metadata"]["generateName"].as_str().unwrap_or("").to_string();
            if prefix.is_empty() {
                return Err(ApiError::invalid(
                    &t.kind,
                    "",
                    &[(
                        "metadata.name".into(),
                        "Required value: name or generateName is required".into(),
                    )],
                ));
            }
            obj["metadata"]["name"] = json!(format!("{prefix}{}", random_suffix()));
        }
        let name = meta_str(&obj, "name").to_string();
        if !valid_name(&name) {
            return Err(ApiError::invalid(&t.kind, &name, &[("metadata.name".into(), format!("Invalid value: {name:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.'"))]));
        }
        if t.namespaced {
            if ns.is_empty() {
                return Err(ApiError::bad_request(format!(
                    "{} is namespaced: a namespace is required",
                    t.plural
                )));
            }
            let ns_key = (String::new(), "namespaces".to_string());
            let ns_obj = inner
                .objects
                .get(&ns_key)
                .and_then(|m| m.get(&(String::new(), ns.to_string())));
            match ns_obj {
                None => return Err(ApiError::not_found("namespaces", ns)),
                Some(n) if !n["metadata"]["deletionTimestamp"].is_null() => {
                    return Err(ApiError::new(
                        403,
                        "Forbidden",
                        format!("unable to create new content in namespace {ns} because it is being terminated"),
                    ))
                }
                Some(_) => {}
            }
            obj["metadata"]["namespace"] = json!(ns);
        } else if let Some(m) = obj["metadata"].as_object_mut() {
            m.remove("namespace");
        }
        let key = (ns.to_string(), name.clone());
        if inner.objects.get(&t.key()).is_some_and(|m| m.contains_key(&key)) {
            return Err(ApiError::already_exists(&t.plural, &name));
        }
        obj["apiVersion"] = json!(t.api_version());
        obj["kind"] = json!(t.kind);
        // The uid exists before admission: a Job's generated selector names it.
        obj["metadata"]["uid"] = json!(uuid::Uuid::new_v4().to_string());
        if let Some(m) = manager {
            let empty = json!({"metadata": {}});
            record_update(
                &empty,
                &mut obj,
                m,
                main_scope(t),
                &t.api_version(),
                &now(),
                t.schema.as_ref(),
            );
        }
        admit(t, &mut obj, None)?;
        admission::validate(&AdmissionRequest {
            operation: Operation::Create,
            t,
            subresource: "",
            object: Some(&obj),
            old_object: None,
        })?;
        inner.rv += 1;
        let rv = inner.rv;
        stamp_new(&mut obj, rv, t.status_subresource);
        self.after_write(&mut inner, t, &obj)?;
        inner.objects.entry(t.key()).or_default().insert(key, obj.clone());
        self.emit(&mut inner, t.key(), EventKind::Added, obj.clone(), None);
        Ok(obj)
    }

    /// PUT: replaces the object (or only its status for `Sub::Status`);
    /// a stale `metadata.resourceVersion` is a 409.
    pub fn update(
        &self,
        t: &ResourceType,
        ns: &str,
        name: &str,
        mut obj: Value,
        sub: Sub,
        manager: &str,
    ) -> Result<Value, ApiError> {
        let mut inner = self.lock();
        let current = lookup(&inner, t, ns, name)?;
        let given_rv = meta_str(&obj, "resourceVersion");
        if !given_rv.is_empty() && given_rv != meta_str(&current, "resourceVersion") {
            return Err(ApiError::conflict(&t.plural, name));
        }
        if !meta_str(&obj, "name").is_empty() && meta_str(&obj, "name") != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({}) does not match the name on the URL ({name})",
                meta_str(&obj, "name")
            )));
        }
        record_update(
            &current,
            &mut obj,
            manager,
            scope_of(t, sub),
            &t.api_version(),
            &now(),
            t.schema.as_ref(),
        );
        self.commit_update(&mut inner, t, ns, name, current, obj, sub)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn patch(
        &self,
        t: &ResourceType,
        ns: &str,
        name: &str,
        kind: PatchKind,
        body: &Value,
        sub: Sub,
        manager: &str,
        force: bool,
    ) -> Result<Value, ApiError> {
        let mut inner = self.lock();
        let current = match lookup(&inner, t, ns, name) {
            Ok(c) => c,
            Err(e) if kind == PatchKind::Apply && e.code == 404 && sub == Sub::Main => {
                drop(inner);
                return self.apply_create(t, ns, name, body, manager);
            }
            Err(e) => return Err(e),
        };
        let mut next = current.clone();
        match kind {
            PatchKind::Merge => patch::json_merge(&mut next, body),
            PatchKind::Strategic => patch::strategic_merge(&mut next, body),
            PatchKind::Json => patch::json_patch(&mut next, body).map_err(|m| ApiError::new(422, "Invalid", m))?,
            PatchKind::Apply => {
                check_apply_body(t, name, body)?;
                let scope = scope_of(t, sub);
                next = server_side_apply(&current, body, manager, force, scope, &now(), t.schema.as_ref()).map_err(|conflicts| {
                    let msgs: Vec<String> = conflicts.iter().map(|c| format!("{}: {}", c.owner(), c.field)).collect();
                    ApiError::new(409, "Conflict", format!("Apply failed with {} conflict{}: {}", conflicts.len(), if conflicts.len() == 1 { "" } else { "s" }, msgs.join("; ")))
                        .with_details(json!({"name": name, "kind": t.plural, "causes": conflicts.iter().map(|c| json!({"reason": "FieldManagerConflict", "message": c.owner(), "field": c.field})).collect::<Vec<_>>()}))
                })?;
            }
        }
        if kind != PatchKind::Apply {
            if let Some(rv) = body["metadata"]["resourceVersion"].as_str() {
                if rv != meta_str(&current, "resourceVersion") {
                    return Err(ApiError::conflict(&t.plural, name));
                }
            }
            record_update(
                &current,
                &mut next,
                manager,
                scope_of(t, sub),
                &t.api_version(),
                &now(),
                t.schema.as_ref(),
            );
        }
        next["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"].clone();
        self.commit_update(&mut inner, t, ns, name, current, next, sub)
    }

    fn apply_create(
        &self,
        t: &ResourceType,
        ns: &str,
        name: &str,
        body: &Value,
        manager: &str,
    ) -> Result<Value, ApiError> {
        check_apply_body(t, name, body)?;
        let base = json!({"apiVersion": t.api_version(), "kind": t.kind, "metadata": {"name": name}});
        let scope = main_scope(t);
        let obj = server_side_apply(&base, body, manager, true, scope, &now(), t.schema.as_ref())
            .map_err(|_| ApiError::new(500, "InternalError", "apply to an empty object conflicted"))?;
        self.create(t, ns, obj)
    }

    #[allow(clippy::too_many_arguments)]
    fn commit_update(
        &self,
        inner: &mut Inner,
        t: &ResourceType,
        ns: &str,
        name: &str,
        current: Value,
        mut next: Value,
        sub: Sub,
    ) -> Result<Value, ApiError> {
        next["apiVersion"] = json!(t.api_version());
        next["kind"] = json!(t.kind);
        // The server owns identity and bookkeeping fields.
        for f in [
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "generation",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
        ] {
            match current["metadata"].get(f) {
                Some(v) => next["metadata"][f] = v.clone(),
                None => {
                    if let Some(m) = next["metadata"].as_object_mut() {
                        m.remove(f);
                    }
                }
            }
        }
        if t.status_subresource {
            match sub {
                Sub::Main => match current.get("status") {
                    Some(s) => next["status"] = s.clone(),
                    None => {
                        if let Some(m) = next.as_object_mut() {
                            m.remove("status");
                        }
                    }
                },
                Sub::Status => {
                    let status = next.get("status").cloned();
                    let managed = next["metadata"]["managedFields"].clone();
                    next = current.clone();
                    match status {
                        Some(s) => next["status"] = s,
                        None => {
                            if let Some(m) = next.as_object_mut() {
                                m.remove("status");
                            }
                        }
                    }
                    if !managed.is_null() {
                        next["metadata"]["managedFields"] = managed;
                    }
                }
            }
        }
        if !current["metadata"]["deletionTimestamp"].is_null() {
            let had: Vec<Value> = current["metadata"]["finalizers"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let adds = next["metadata"]["finalizers"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|f| !had.contains(f));
            if adds {
                return Err(ApiError::invalid(
                    &t.kind,
                    name,
                    &[(
                        "metadata.finalizers".into(),
                        "Forbidden: no new finalizers can be added if the object is being deleted".into(),
                    )],
                ));
            }
        }
        admit(t, &mut next, Some(&current))?;
        admission::validate(&AdmissionRequest {
            operation: Operation::Update,
            t,
            subresource: if sub == Sub::Status { "status" } else { "" },
            object: Some(&next),
            old_object: Some(&current),
        })?;
        let unchanged = {
            let mut a = current.clone();
            let mut b = next.clone();
            for o in [&mut a, &mut b] {
                o["metadata"]["resourceVersion"] = Value::Null;
                o["metadata"]["managedFields"] = Value::Null;
            }
            a == b && current["metadata"]["managedFields"] == next["metadata"]["managedFields"]
        };
        if unchanged {
            // A no-op write does not bump the resourceVersion or notify watchers.
            return Ok(current);
        }
        if t.status_subresource {
            let spec_changed = spec_part(&current) != spec_part(&next);
            let generation = current["metadata"]["generation"].as_i64().unwrap_or(1);
            next["metadata"]["generation"] = json!(if spec_changed { generation + 1 } else { generation });
        }
        inner.rv += 1;
        next["metadata"]["resourceVersion"] = json!(inner.rv.to_string());
        self.after_write(inner, t, &next)?;
        let finalized = !next["metadata"]["deletionTimestamp"].is_null()
            && next["metadata"]["finalizers"].as_array().is_none_or(Vec::is_empty)
            && !(t.kind == "Pod" && pod_needs_kubelet(&next));
        if finalized {
            self.remove_now(inner, t, ns, name);
            return Ok(next);
        }
        inner
            .objects
            .entry(t.key())
            .or_default()
            .insert((ns.to_string(), name.to_string()), next.clone());
        self.emit(inner, t.key(), EventKind::Modified, next.clone(), Some(current));
        Ok(next)
    }

    /// DELETE: objects with finalizers (or running pods) get a
    /// deletionTimestamp and stay until those are done; others go at once.
    pub fn delete(
        &self,
        t: &ResourceType,
        ns: &str,
        name: &str,
        propagation: Option<Propagation>,
        grace_zero: bool,
        precondition_uid: Option<&str>,
    ) -> Result<Value, ApiError> {
        let mut inner = self.lock();
        let current = lookup(&inner, t, ns, name)?;
        if precondition_uid.is_some_and(|u| u != meta_str(&current, "uid")) {
            return Err(ApiError::conflict(&t.plural, name));
        }
        admission::validate(&AdmissionRequest {
            operation: Operation::Delete,
            t,
            subresource: "",
            object: None,
            old_object: Some(&current),
        })?;
        let propagation = propagation.unwrap_or(if t.group == "batch" {
            Propagation::Orphan
        } else {
            Propagation::Background
        });
        let mut next = current.clone();
        let mut finalizers: Vec<Value> = next["metadata"]["finalizers"].as_array().cloned().unwrap_or_default();
        let already = !current["metadata"]["deletionTimestamp"].is_null();
        if !already {
            let extra = match propagation {
                Propagation::Foreground => Some("foregroundDeletion"),
                Propagation::Orphan => Some("orphan"),
                Propagation::Background => None,
            };
            if let Some(f) = extra {
                if !finalizers.contains(&json!(f)) {
                    finalizers.push(json!(f));
                }
            }
        }
        let pod_waits = t.kind == "Pod" && !grace_zero && pod_needs_kubelet(&current);
        if finalizers.is_empty() && !pod_waits {
            self.remove_now(&mut inner, t, ns, name);
            return Ok(current);
        }
        if already && !(t.kind == "Pod" && grace_zero && finalizers.is_empty()) {
            return Ok(current);
        }
        if t.kind == "Pod" && grace_zero && finalizers.is_empty() {
            self.remove_now(&mut inner, t, ns, name);
            return Ok(current);
        }
        next["metadata"]["finalizers"] = json!(finalizers);
        next["metadata"]["deletionTimestamp"] = json!(now());
        next["metadata"]["deletionGracePeriodSeconds"] = json!(if pod_waits { 30 } else { 0 });
        inner.rv += 1;
        next["metadata"]["resourceVersion"] = json!(inner.rv.to_string());
        inner
            .objects
            .entry(t.key())
            .or_default()
            .insert((ns.to_string(), name.to_string()), next.clone());
        self.emit(&mut inner, t.key(), EventKind::Modified, next.clone(), Some(current));
        Ok(next)
    }

    fn remove_now(&self, inner: &mut Inner, t: &ResourceType, ns: &str, name: &str) {
        let Some(obj) = inner
            .objects
            .get_mut(&t.key())
            .and_then(|m| m.remove(&(ns.to_string(), name.to_string())))
        else {
            return;
        };
        inner.rv += 1;
        let mut obj = obj;
        obj["metadata"]["resourceVersion"] = json!(inner.rv.to_string());
        if t.kind == "CustomResourceDefinition" {
            if let Ok(crd_type) = ResourceType::from_crd(&obj) {
                inner.registry.remove(&crd_type.registry_key());
                if let Some(objs) = inner.objects.remove(&crd_type.key()) {
                    for (_, o) in objs {
                        inner.rv += 1;
                        self.emit(inner, crd_type.key(), EventKind::Deleted, o, None);
                    }
                }
            }
        }
        if t.kind == "Namespace" {
            let keys: Vec<TypeKey> = inner.objects.keys().cloned().collect();
            for k in keys {
                let doomed: Vec<ObjKey> = inner.objects[&k].keys().filter(|(n, _)| n == name).cloned().collect();
                for d in doomed {
                    if let Some(o) = inner.objects.get_mut(&k).and_then(|m| m.remove(&d)) {
                        inner.rv += 1;
                        self.emit(inner, k.clone(), EventKind::Deleted, o, None);
                    }
                }
            }
        }
        self.emit(inner, t.key(), EventKind::Deleted, obj, None);
    }

    /// Side effects of writes on special kinds: CRDs (un)register their type.
    fn after_write(&self, inner: &mut Inner, t: &ResourceType, obj: &Value) -> Result<(), ApiError> {
        if t.kind == "CustomResourceDefinition" {
            let crd_type = ResourceType::from_crd(obj).map_err(|m| {
                ApiError::invalid("CustomResourceDefinition", meta_str(obj, "name"), &[("spec".into(), m)])
            })?;
            inner.registry.insert(crd_type);
        }
        Ok(())
    }

    fn emit(&self, inner: &mut Inner, type_key: TypeKey, kind: EventKind, object: Value, old: Option<Value>) {
        let ev = Arc::new(Event {
            rv: inner.rv,
            type_key,
            kind,
            object,
            old,
        });
        inner.history.push_back(ev.clone());
        while inner.history.len() > inner.history_limit {
            if let Some(e) = inner.history.pop_front() {
                inner.compacted = e.rv;
            }
        }
        // No receivers is fine: nobody is watching.
        let _ = self.events.send(ev);
    }

    /// All objects of every type: for the garbage collector.
    pub fn snapshot(&self) -> Vec<(ResourceType, Value)> {
        let inner = self.lock();
        let mut out = Vec::new();
        for (key, objs) in &inner.objects {
            if let Some(t) = inner.registry.get(&key.0, &key.1) {
                out.extend(objs.values().map(|o| (t.clone(), o.clone())));
            }
        }
        out
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.events.subscribe()
    }

    /// Read-modify-write without conflicts, for the simulator's own controllers.
    pub fn modify(
        &self,
        t: &ResourceType,
        ns: &str,
        name: &str,
        sub: Sub,
        f: impl FnOnce(&mut Value),
    ) -> Result<Value, ApiError> {
        let mut inner = self.lock();
        let current = lookup(&inner, t, ns, name)?;
        let mut next = current.clone();
        f(&mut next);
        self.commit_update(&mut inner, t, ns, name, current, next, sub)
    }
}

/// The part of an object a write through `sub` owns fields in.
fn scope_of(t: &ResourceType, sub: Sub) -> Scope {
    match (sub, t.status_subresource) {
        (Sub::Status, _) => Scope::Status,
        (Sub::Main, true) => Scope::NotStatus,
        (Sub::Main, false) => Scope::All,
    }
}

fn main_scope(t: &ResourceType) -> Scope {
    scope_of(t, Sub::Main)
}

fn items_last_key(items: &[Value]) -> ObjKey {
    items
        .last()
        .map(|o| (meta_str(o, "namespace").to_string(), meta_str(o, "name").to_string()))
        .unwrap_or_default()
}

fn encode_continue(key: &ObjKey) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{}\n{}", key.0, key.1))
}

fn decode_continue(tok: &str) -> Result<ObjKey, ApiError> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(tok)
        .map_err(|_| ApiError::bad_request("invalid continue token"))?;
    let s = String::from_utf8(bytes).map_err(|_| ApiError::bad_request("invalid continue token"))?;
    let (ns, name) = s
        .split_once('\n')
        .ok_or_else(|| ApiError::bad_request("invalid continue token"))?;
    Ok((ns.to_string(), name.to_string()))
}

fn lookup(inner: &Inner, t: &ResourceType, ns: &str, name: &str) -> Result<Value, ApiError> {
    inner
        .objects
        .get(&t.key())
        .and_then(|m| m.get(&(ns.to_string(), name.to_string())))
        .cloned()
        .ok_or_else(|| ApiError::not_found(&t.plural, name))
}

/// Identity and bookkeeping of a new object; a uid given by the store (not
/// the client: `create` replaces any) is kept.
fn stamp_new(obj: &mut Value, rv: u64, has_generation: bool) {
    if meta_str(obj, "uid").is_empty() {
        obj["metadata"]["uid"] = json!(uuid::Uuid::new_v4().to_string());
    }
    obj["metadata"]["creationTimestamp"] = json!(now());
    obj["metadata"]["resourceVersion"] = json!(rv.to_string());
    if has_generation {
        obj["metadata"]["generation"] = json!(1);
    }
    if let Some(m) = obj["metadata"].as_object_mut() {
        m.remove("deletionTimestamp");
    }
}

fn random_suffix() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::thread_rng();
    (0..5)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect()
}

/// A pod bound to a node and not finished needs its kubelet to stop it.
fn pod_needs_kubelet(pod: &Value) -> bool {
    !pod["spec"]["nodeName"].as_str().unwrap_or("").is_empty()
        && !matches!(pod["status"]["phase"].as_str(), Some("Succeeded" | "Failed"))
}

fn check_apply_body(t: &ResourceType, name: &str, body: &Value) -> Result<(), ApiError> {
    if body["kind"].as_str() != Some(t.kind.as_str()) {
        return Err(ApiError::bad_request(format!("apply: kind must be {:?}", t.kind)));
    }
    if body["metadata"]["name"].as_str().is_some_and(|n| n != name) {
        return Err(ApiError::bad_request(format!(
            "apply: metadata.name must be {name:?} (the name in the URL)"
        )));
    }
    Ok(())
}

/// Defaults and validation on every write, per kind.
fn admit(t: &ResourceType, obj: &mut Value, old: Option<&Value>) -> Result<(), ApiError> {
    let name = meta_str(obj, "name").to_string();
    if let Some(labels) = obj["metadata"]["labels"].as_object() {
        for (k, v) in labels {
            let bad_value = !v.is_string() || v.as_str().is_some_and(|s| s.len() > 63);
            if bad_value || k.is_empty() {
                return Err(ApiError::invalid(
                    &t.kind,
                    &name,
                    &[(
                        format!("metadata.labels.{k}"),
                        "Invalid value: label values must be strings of at most 63 characters".into(),
                    )],
                ));
            }
        }
    }
    match t.kind.as_str() {
        "Event" => super::events::normalize(obj, t.is_events_v1()),
        "Pod" => {
            if obj["spec"]["containers"].as_array().is_none_or(Vec::is_empty) {
                return Err(ApiError::invalid(
                    "Pod",
                    &name,
                    &[("spec.containers".into(), "Required value".into())],
                ));
            }
            if obj["spec"]["serviceAccountName"].is_null() {
                obj["spec"]["serviceAccountName"] = json!("default");
            }
            if obj["spec"]["restartPolicy"].is_null() {
                obj["spec"]["restartPolicy"] = json!("Always");
            }
            if old.is_none() && obj["status"]["phase"].is_null() {
                obj["status"] = json!({"phase": "Pending"});
            }
            if let Some(o) = old {
                if !o["spec"]["nodeName"].as_str().unwrap_or("").is_empty()
                    && o["spec"]["nodeName"] != obj["spec"]["nodeName"]
                {
                    return Err(ApiError::invalid(
                        "Pod",
                        &name,
                        &[(
                            "spec.nodeName".into(),
                            "Forbidden: pod updates may not change nodeName".into(),
                        )],
                    ));
                }
            }
        }
        "Job" => {
            let errors = admit_job(obj, old);
            if !errors.is_empty() {
                return Err(ApiError::invalid("Job", &name, &errors));
            }
        }
        "CustomResourceDefinition" => {
            let crd = ResourceType::from_crd(obj)
                .map_err(|m| ApiError::invalid("CustomResourceDefinition", &name, &[("spec".into(), m)]))?;
            obj["status"] = json!({
                "acceptedNames": obj["spec"]["names"].clone(),
                "storedVersions": crd.versions,
                "conditions": [
                    {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found", "lastTransitionTime": now()},
                    {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted", "lastTransitionTime": now()}
                ]
            });
        }
        _ => {}
    }
    if let Some(schema) = &t.schema {
        let errors = schema::validate_and_prune(schema, obj);
        if !errors.is_empty() {
            return Err(ApiError::invalid(&t.kind, &name, &errors));
        }
    }
    Ok(())
}

/// batch/v1 Job defaulting and validation, as the real API server does them:
/// the pod template is defaulted like any PodSpec (`restartPolicy: Always`),
/// which a Job refuses; the selector is generated on create (unless
/// `manualSelector`) and, with the template, immutable afterwards; every
/// container needs a name and an image. Returns every problem at once.
fn admit_job(obj: &mut Value, old: Option<&Value>) -> Vec<(String, String)> {
    let mut errors = Vec::new();
    // Indexing below writes into these: they must be objects (or absent).
    for (path, v) in [
        ("spec", &obj["spec"]),
        ("spec.template", &obj["spec"]["template"]),
        ("spec.template.metadata", &obj["spec"]["template"]["metadata"]),
        (
            "spec.template.metadata.labels",
            &obj["spec"]["template"]["metadata"]["labels"],
        ),
        ("spec.template.spec", &obj["spec"]["template"]["spec"]),
    ] {
        if !(v.is_object() || v.is_null()) {
            errors.push((path.to_string(), "Invalid value: must be an object".to_string()));
        }
    }
    if obj["spec"]["template"]["spec"].is_null() {
        errors.push(("spec.template.spec".into(), "Required value".into()));
    }
    if !errors.is_empty() {
        return errors;
    }
    let spec = &mut obj["spec"];
    for (k, v) in [("completions", 1), ("parallelism", 1), ("backoffLimit", 6)] {
        if spec[k].is_null() {
            spec[k] = json!(v);
        }
    }
    if spec["template"]["spec"]["restartPolicy"].is_null() {
        spec["template"]["spec"]["restartPolicy"] = json!("Always");
    }
    let policy = &spec["template"]["spec"]["restartPolicy"];
    if !matches!(policy.as_str(), Some("OnFailure" | "Never")) {
        errors.push((
            "spec.template.spec.restartPolicy".into(),
            format!("Unsupported value: {policy}: supported values: \"OnFailure\", \"Never\""),
        ));
    }
    match spec["template"]["spec"]["containers"].as_array() {
        Some(cs) if !cs.is_empty() => {
            for (i, c) in cs.iter().enumerate() {
                for field in ["name", "image"] {
                    if c[field].as_str().is_none_or(str::is_empty) {
                        errors.push((
                            format!("spec.template.spec.containers[{i}].{field}"),
                            "Required value".into(),
                        ));
                    }
                }
            }
        }
        _ => errors.push(("spec.template.spec.containers".into(), "Required value".into())),
    }
    match old {
        None => {
            let uid = meta_str(obj, "uid").to_string();
            let name = meta_str(obj, "name").to_string();
            let spec = &mut obj["spec"];
            let manual = spec["manualSelector"].as_bool() == Some(true);
            let generated = json!({"matchLabels": {"batch.kubernetes.io/controller-uid": uid}});
            if manual {
                if spec["selector"].is_null() {
                    errors.push(("spec.selector".into(), "Required value".into()));
                }
            } else if spec["selector"].is_null() || spec["selector"] == generated {
                spec["selector"] = generated;
                let labels = &mut spec["template"]["metadata"]["labels"];
                for (k, v) in [
                    ("batch.kubernetes.io/controller-uid", &uid),
                    ("batch.kubernetes.io/job-name", &name),
                    ("controller-uid", &uid),
                    ("job-name", &name),
                ] {
                    labels[k] = json!(v);
                }
            } else {
                errors.push((
                    "spec.selector".into(),
                    format!("Invalid value: {}: `selector` will be auto-generated", spec["selector"]),
                ));
            }
        }
        Some(old) => {
            for field in ["selector", "template"] {
                if old["spec"][field] != obj["spec"][field] {
                    errors.push((
                        format!("spec.{field}"),
                        format!("Invalid value: {}: field is immutable", obj["spec"][field]),
                    ));
                }
            }
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cm(name: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"a": "1"}})
    }

    #[test]
    fn stale_update_conflicts_and_noop_keeps_version() {
        let s = Store::new(100);
        let t = s.resource_type("", "configmaps").unwrap();
        let created = s.create(&t, "default", cm("x")).unwrap();
        let mut stale = created.clone();
        stale["data"]["a"] = json!("2");
        let updated = s.update(&t, "default", "x", stale.clone(), Sub::Main, "t").unwrap();
        assert!(
            updated["metadata"]["generation"].is_null(),
            "ConfigMaps have no generation"
        );
        assert_eq!(
            s.update(&t, "default", "x", stale, Sub::Main, "t").unwrap_err().code,
            409
        );
        let same = s.update(&t, "default", "x", updated.clone(), Sub::Main, "t").unwrap();
        assert_eq!(
            same["metadata"]["resourceVersion"],
            updated["metadata"]["resourceVersion"]
        );
    }

    #[test]
    fn watch_history_is_bounded() {
        let s = Store::new(3);
        let t = s.resource_type("", "configmaps").unwrap();
        let first = s.create(&t, "default", cm("a")).unwrap();
        let rv: u64 = first["metadata"]["resourceVersion"].as_str().unwrap().parse().unwrap();
        for n in ["b", "c", "d", "e"] {
            s.create(&t, "default", cm(n)).unwrap();
        }
        assert_eq!(s.watch(&t, Some(rv - 1)).unwrap_err().code, 410);
        let (events, _, _) = s.watch(&t, Some(rv + 2)).unwrap();
        assert_eq!(events.len(), 2);
    }

    #[test]
    fn namespaced_objects_need_their_namespace() {
        let s = Store::new(10);
        let t = s.resource_type("", "configmaps").unwrap();
        assert_eq!(s.create(&t, "nope", cm("a")).unwrap_err().code, 404);
    }
}
