//! The HTTP surface: discovery, the REST verbs on `/api/v1/...` and
//! `/apis/<group>/<version>/...`, watch streams, and Table output.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tokio::sync::broadcast::error::RecvError;

use super::admission::{self, RequestContext};
use super::auth::UserInfo;
use super::error::ApiError;
use super::rbac::{Attributes, RbacSnapshot};
use super::schema;
use super::selector::{FieldSelector, LabelSelector};
use super::store::{EventKind, ListOptions, PatchKind, Propagation, Store, Sub};
use super::table::to_table;
use super::types::ResourceType;
use super::{Faults, RequestStats};

pub struct ServerState {
    pub store: Store,
    pub faults: Faults,
    pub stats: RequestStats,
    pub bookmark_interval: Duration,
    pub logs: super::PodLogs,
    pub auth: super::auth::Authenticator,
}

fn json_response(code: u16, v: &Value) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, [(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response()
}

fn error_response(e: &ApiError) -> Response {
    json_response(e.code, &e.status())
}

/// A parsed resource path.
struct Target {
    t: ResourceType,
    namespace: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

pub async fn handle(
    state: axum::extract::State<Arc<ServerState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let query: HashMap<String, String> = uri
        .query()
        .map(|q| url::form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let agent = headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let path = uri.path().trim_end_matches('/').to_string();
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let is_watch = query.get("watch").is_some_and(|w| w == "true" || w == "1");
    state.stats.record(&agent, method.as_str(), is_watch);

    if let ["healthz" | "readyz" | "livez"] = segs.as_slice() {
        return (StatusCode::OK, "ok").into_response();
    }
    let user = match state.auth.authenticate(&headers) {
        Ok(u) => u,
        Err(e) => return error_response(&e),
    };
    // Discovery, /openapi and /version: every authenticated user.
    if let Some(resp) = discovery(&state.store, &segs) {
        return resp;
    }
    if let (&Method::GET, ["api", "v1", "namespaces", ns, "pods", name, "log"]) = (&method, segs.as_slice()) {
        let attrs = Attributes::new("get", "", "pods", ns, name).subresource("log");
        if let Err(e) = authorize(&state.store, &user, &attrs) {
            return error_response(&e);
        }
        return pod_log(&state, ns, name, query.get("container").map(String::as_str));
    }
    let target = match parse_target(&state.store, &segs) {
        Ok(t) => t,
        Err(e) => return error_response(&e),
    };
    let ns = target.namespace.as_deref().unwrap_or("");
    if let Err(e) = authorize_request(&state.store, &user, &method, &target, &query, &headers, is_watch) {
        return error_response(&e);
    }
    if query.get("fieldValidation").is_some_and(|v| v == "Strict")
        && matches!(method, Method::POST | Method::PUT | Method::PATCH)
    {
        if let (Some(schema), Ok(obj)) = (&target.t.schema, parse_body(&headers, &body)) {
            let unknown = if obj.is_object() {
                schema::unknown_fields(schema, &obj)
            } else {
                vec![]
            };
            if !unknown.is_empty() {
                let list: Vec<String> = unknown.iter().map(|f| format!("unknown field {f:?}")).collect();
                return error_response(&ApiError::bad_request(format!(
                    "{} in version {:?} cannot be handled as a {}: strict decoding error: {}",
                    target.t.kind,
                    target.t.versions[0],
                    target.t.kind,
                    list.join(", ")
                )));
            }
        }
    }
    if method == Method::GET && target.name.is_none() && is_watch {
        return watch(&state, &target, &query);
    }
    let admission = if matches!(method, Method::POST | Method::PUT | Method::PATCH | Method::DELETE) {
        match RequestContext::from_store(&state.store, &user) {
            Ok(ctx) => ctx.map(Arc::new),
            Err(e) => return error_response(&e),
        }
    } else {
        None
    };
    let result: Result<(u16, Value), ApiError> = admission::with_request(admission, || match (&method, &target.name) {
        (&Method::GET, None) => list(&state.store, &target, &query, &headers).map(|v| (200, v)),
        (&Method::GET, Some(name)) => state
            .store
            .get(&target.t, ns, name)
            .map(|o| (200, maybe_table(&target.t, &headers, labelled(&target.t, o)))),
        (&Method::POST, None) => parse_body(&headers, &body)
            .and_then(|o| {
                state
                    .store
                    .create_by(&target.t, ns, o, Some(&field_manager(&query, &agent)))
            })
            .map(|o| (201, o)),
        (&Method::PUT, Some(name)) => parse_body(&headers, &body)
            .and_then(|o| {
                state
                    .store
                    .update(&target.t, ns, name, o, sub(&target), &field_manager(&query, &agent))
            })
            .map(|o| (200, o)),
        (&Method::PATCH, Some(name)) => {
            patch(&state.store, &target, name, &headers, &body, &query, &agent).map(|o| (200, o))
        }
        (&Method::DELETE, Some(name)) => delete(&state.store, &target, name, &query, &body),
        (&Method::DELETE, None) => delete_collection(&state.store, &target, &query).map(|v| (200, v)),
        _ => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!("{method} is not supported on {path}"),
        )),
    });
    match result {
        Ok((code, v)) => json_response(code, &v),
        Err(e) => {
            tracing::debug!(%method, %path, code = e.code, message = %e.message, "request failed");
            error_response(&e)
        }
    }
}

/// RBAC for `user` doing `attrs`; `system:masters` is never asked.
fn authorize(store: &Store, user: &UserInfo, attrs: &Attributes) -> Result<(), ApiError> {
    if user.is_superuser() {
        return Ok(());
    }
    let decision = RbacSnapshot::from_store(store)?.authorize(user, attrs);
    if decision.allowed {
        Ok(())
    } else {
        Err(attrs.forbidden(user, &decision.reason))
    }
}

/// The verb a request maps to, as kube-apiserver's request info does.
fn verb(method: &Method, target: &Target, is_watch: bool) -> &'static str {
    match (method, target.name.is_some()) {
        (&Method::GET, true) => "get",
        (&Method::GET, false) if is_watch => "watch",
        (&Method::GET, false) => "list",
        (&Method::POST, _) => "create",
        (&Method::PUT, _) => "update",
        (&Method::PATCH, _) => "patch",
        (&Method::DELETE, true) => "delete",
        (&Method::DELETE, false) => "deletecollection",
        _ => "unknown",
    }
}

/// RBAC for a resource request. A list or watch with a `metadata.name=`
/// field selector carries that name; a server-side apply that would create
/// the object also needs `create` (kube-apiserver's patch handler checks it).
fn authorize_request(
    store: &Store,
    user: &UserInfo,
    method: &Method,
    target: &Target,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    is_watch: bool,
) -> Result<(), ApiError> {
    if user.is_superuser() {
        return Ok(());
    }
    let verb = verb(method, target, is_watch);
    let name = match &target.name {
        Some(n) => n.clone(),
        None if verb == "list" || verb == "watch" => query
            .get("fieldSelector")
            .and_then(|f| f.split(',').find_map(|p| p.strip_prefix("metadata.name=")))
            .unwrap_or("")
            .to_string(),
        None => String::new(),
    };
    let namespace = target.namespace.as_deref().unwrap_or("");
    let mut attrs = Attributes::new(verb, &target.t.group, &target.t.plural, namespace, &name);
    if let Some(s) = &target.sub {
        attrs = attrs.subresource(s);
    }
    let snapshot = RbacSnapshot::from_store(store)?;
    let deny = |a: &Attributes| {
        let d = snapshot.authorize(user, a);
        (!d.allowed).then(|| a.forbidden(user, &d.reason))
    };
    if let Some(e) = deny(&attrs) {
        return Err(e);
    }
    let applies = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("application/apply-patch"));
    if *method == Method::PATCH && applies && target.sub.is_none() {
        if let Some(n) = &target.name {
            if store.get(&target.t, namespace, n).is_err_and(|e| e.code == 404) {
                let mut create = attrs.clone();
                create.verb = "create".into();
                if let Some(e) = deny(&create) {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

fn sub(t: &Target) -> Sub {
    if t.sub.as_deref() == Some("status") {
        Sub::Status
    } else {
        Sub::Main
    }
}

fn parse_body(headers: &HeaderMap, body: &Bytes) -> Result<Value, ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if ct.contains("protobuf") {
        return Err(ApiError::new(
            415,
            "UnsupportedMediaType",
            "protobuf is not supported by the simulator; send JSON (kubectl: use `kubectl apply -f` \
             instead of `kubectl create <kind>`, which encodes built-in kinds as protobuf)",
        ));
    }
    if ct.contains("yaml") {
        serde_yaml::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid YAML body: {e}")))
    } else {
        serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
    }
}

/// The object as the API it is read through names it (one stored Event is
/// read as core/v1 or as events.k8s.io/v1).
fn labelled(t: &ResourceType, mut obj: Value) -> Value {
    obj["apiVersion"] = json!(t.api_version());
    obj["kind"] = json!(t.kind);
    obj
}

fn wants_table(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("as=Table"))
}

fn maybe_table(t: &ResourceType, headers: &HeaderMap, obj: Value) -> Value {
    if wants_table(headers) {
        let rv = obj["metadata"]["resourceVersion"].as_str().unwrap_or("").to_string();
        to_table(t, &[obj], &rv)
    } else {
        obj
    }
}

fn list_options(query: &HashMap<String, String>) -> Result<ListOptions, ApiError> {
    Ok(ListOptions {
        labels: LabelSelector::parse(query.get("labelSelector").map(String::as_str).unwrap_or(""))
            .map_err(ApiError::bad_request)?,
        fields: FieldSelector::parse(query.get("fieldSelector").map(String::as_str).unwrap_or(""))
            .map_err(ApiError::bad_request)?,
        limit: query.get("limit").and_then(|l| l.parse().ok()),
        continue_token: query.get("continue").filter(|c| !c.is_empty()).cloned(),
    })
}

fn list(
    store: &Store,
    target: &Target,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
) -> Result<Value, ApiError> {
    let opts = list_options(query)?;
    let (items, rv, next) = store.list(&target.t, target.namespace.as_deref(), &opts)?;
    let items: Vec<Value> = items.into_iter().map(|o| labelled(&target.t, o)).collect();
    if wants_table(headers) {
        let mut table = to_table(&target.t, &items, &rv.to_string());
        if let Some(n) = next {
            table["metadata"]["continue"] = json!(n);
        }
        return Ok(table);
    }
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if let Some(n) = next {
        meta["continue"] = json!(n);
    }
    Ok(json!({
        "apiVersion": target.t.api_version(),
        "kind": format!("{}List", target.t.kind),
        "metadata": meta,
        "items": items,
    }))
}

fn patch(
    store: &Store,
    target: &Target,
    name: &str,
    headers: &HeaderMap,
    body: &Bytes,
    query: &HashMap<String, String>,
    agent: &str,
) -> Result<Value, ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let kind = if ct.starts_with("application/apply-patch") {
        PatchKind::Apply
    } else if ct.starts_with("application/json-patch+json") {
        PatchKind::Json
    } else if ct.starts_with("application/strategic-merge-patch+json") {
        if !target.t.builtin {
            return Err(ApiError::new(415, "UnsupportedMediaType", "strategic merge patch is not supported for custom resources; use a JSON merge patch or server-side apply"));
        }
        PatchKind::Strategic
    } else if ct.starts_with("application/merge-patch+json") {
        PatchKind::Merge
    } else {
        return Err(ApiError::new(
            415,
            "UnsupportedMediaType",
            format!("unsupported patch content type {ct:?}"),
        ));
    };
    let manager = query.get("fieldManager").cloned().unwrap_or_default();
    if kind == PatchKind::Apply && manager.is_empty() {
        return Err(ApiError::bad_request(
            "PATCH with application/apply-patch+yaml requires the fieldManager parameter",
        ));
    }
    let manager = field_manager(query, agent);
    let force = query.get("force").is_some_and(|f| f == "true");
    let body = parse_body(headers, body)?;
    store.patch(
        &target.t,
        target.namespace.as_deref().unwrap_or(""),
        name,
        kind,
        &body,
        sub(target),
        &manager,
        force,
    )
}

/// The `fieldManager` parameter, or as the real server derives one: the
/// User-Agent up to its first `/`.
fn field_manager(query: &HashMap<String, String>, agent: &str) -> String {
    match query.get("fieldManager").filter(|m| !m.is_empty()) {
        Some(m) => m.clone(),
        None => agent.split('/').next().unwrap_or("").to_string(),
    }
}

fn delete_options(query: &HashMap<String, String>, body: &Bytes) -> (Option<Propagation>, bool, Option<String>) {
    let opts: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let policy = opts["propagationPolicy"]
        .as_str()
        .map(String::from)
        .or_else(|| query.get("propagationPolicy").cloned())
        .or_else(|| match opts["orphanDependents"].as_bool() {
            Some(true) => Some("Orphan".into()),
            _ => None,
        });
    let propagation = policy.and_then(|p| match p.as_str() {
        "Foreground" => Some(Propagation::Foreground),
        "Orphan" => Some(Propagation::Orphan),
        "Background" => Some(Propagation::Background),
        _ => None,
    });
    let grace_zero =
        opts["gracePeriodSeconds"].as_i64() == Some(0) || query.get("gracePeriodSeconds").is_some_and(|g| g == "0");
    let uid = opts["preconditions"]["uid"].as_str().map(String::from);
    (propagation, grace_zero, uid)
}

fn delete(
    store: &Store,
    target: &Target,
    name: &str,
    query: &HashMap<String, String>,
    body: &Bytes,
) -> Result<(u16, Value), ApiError> {
    let (propagation, grace_zero, uid) = delete_options(query, body);
    let ns = target.namespace.as_deref().unwrap_or("");
    let obj = store.delete(&target.t, ns, name, propagation, grace_zero, uid.as_deref())?;
    // Gone at once: 200 with the last state; pending finalizers or a kubelet: 202.
    let code = if obj["metadata"]["deletionTimestamp"].is_null() {
        200
    } else {
        202
    };
    Ok((code, labelled(&target.t, obj)))
}

fn delete_collection(store: &Store, target: &Target, query: &HashMap<String, String>) -> Result<Value, ApiError> {
    let opts = list_options(query)?;
    let (items, _, _) = store.list(&target.t, target.namespace.as_deref(), &opts)?;
    for o in &items {
        let ns = o["metadata"]["namespace"].as_str().unwrap_or("");
        let name = o["metadata"]["name"].as_str().unwrap_or("");
        store.delete(&target.t, ns, name, None, false, None)?;
    }
    Ok(
        json!({"apiVersion": target.t.api_version(), "kind": format!("{}List", target.t.kind), "metadata": {}, "items": items}),
    )
}

fn watch(state: &Arc<ServerState>, target: &Target, query: &HashMap<String, String>) -> Response {
    let opts = match list_options(query) {
        Ok(o) => o,
        Err(e) => return error_response(&e),
    };
    let since = match query.get("resourceVersion").map(String::as_str) {
        None | Some("") | Some("0") => None,
        Some(rv) => match rv.parse::<u64>() {
            Ok(n) => Some(n),
            Err(_) => return error_response(&ApiError::bad_request(format!("invalid resourceVersion {rv:?}"))),
        },
    };
    let bookmarks = query.get("allowWatchBookmarks").is_some_and(|b| b == "true");
    let initial_end_marker = query.get("sendInitialEvents").is_some_and(|b| b == "true");
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));
    let cut_after = state.faults.watch_cut();
    let t = target.t.clone();
    let ns = target.namespace.clone();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(256);
    let first = state.store.watch(&t, since);
    let bookmark_interval = state.bookmark_interval;
    tokio::spawn(async move {
        let send_line = |v: Value| {
            let mut line = v.to_string();
            line.push('\n');
            Ok::<_, std::io::Error>(Bytes::from(line))
        };
        let (initial, start_rv, mut events) = match first {
            Ok(x) => x,
            Err(e) => {
                // Expired versions are reported in the stream, as the real server does.
                let _ = tx.send(send_line(json!({"type": "ERROR", "object": e.status()}))).await;
                return;
            }
        };
        let in_scope = |o: &Value| {
            ns.as_deref()
                .is_none_or(|n| o["metadata"]["namespace"].as_str() == Some(n))
                && opts.matches(o)
        };
        let mut seen_rv = start_rv;
        for e in initial {
            let line = json!({"type": e.kind.as_str(), "object": labelled(&t, e.object.clone())});
            if in_scope(&e.object) && tx.send(send_line(line)).await.is_err() {
                return;
            }
            seen_rv = seen_rv.max(e.rv);
        }
        let bookmark = |rv: u64, end: bool| {
            let mut meta = json!({"resourceVersion": rv.to_string()});
            if end {
                meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
            }
            json!({"type": "BOOKMARK", "object": {"kind": t.kind, "apiVersion": t.api_version(), "metadata": meta}})
        };
        if initial_end_marker && since.is_none() && tx.send(send_line(bookmark(seen_rv, true))).await.is_err() {
            return;
        }
        let deadline = Instant::now() + cut_after.unwrap_or(timeout).min(timeout);
        let mut ticker = tokio::time::interval(bookmark_interval);
        ticker.tick().await;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline.into()) => return,
                _ = ticker.tick(), if bookmarks => {
                    if tx.send(send_line(bookmark(seen_rv, false))).await.is_err() {
                        return;
                    }
                }
                ev = events.recv() => {
                    let ev = match ev {
                        Ok(ev) => ev,
                        // A watcher that fell behind is closed; the client resumes
                        // from its last version (or re-lists on 410).
                        Err(RecvError::Lagged(_)) | Err(RecvError::Closed) => return,
                    };
                    seen_rv = seen_rv.max(ev.rv);
                    if ev.type_key != t.key() {
                        continue;
                    }
                    let now_in = in_scope(&ev.object);
                    let was_in = ev.old.as_ref().is_some_and(&in_scope);
                    let kind = match (ev.kind, was_in, now_in) {
                        (EventKind::Modified, true, true) => "MODIFIED",
                        (EventKind::Modified, false, true) => "ADDED",
                        (EventKind::Modified, true, false) => "DELETED",
                        (EventKind::Added, _, true) => "ADDED",
                        (EventKind::Deleted, _, true) => "DELETED",
                        _ => continue,
                    };
                    if tx.send(send_line(json!({"type": kind, "object": labelled(&t, ev.object.clone())}))).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    Response::builder()
        .status(200)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::TRANSFER_ENCODING, "chunked")
        .body(Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx)))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

fn parse_target(store: &Store, segs: &[&str]) -> Result<Target, ApiError> {
    let (group, version, rest) = match segs {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => {
            return Err(ApiError::new(
                404,
                "NotFound",
                format!("the server could not find the requested resource: /{}", segs.join("/")),
            ))
        }
    };
    let unknown = || {
        ApiError::new(
            404,
            "NotFound",
            format!("the server could not find the requested resource: /{}", segs.join("/")),
        )
    };
    let find = |plural: &str| store.with_registry(|r| r.lookup(group, version, plural).cloned());
    let (namespace, rest) = match rest {
        ["namespaces", ns, plural, tail @ ..] if group.is_empty() || find(plural).is_some() => {
            if find(plural).is_some_and(|t| t.namespaced) {
                (Some(ns.to_string()), &rest[2..])
            } else if tail.is_empty() && (*plural == "status" || *plural == "finalize") {
                (None, rest)
            } else {
                (Some(ns.to_string()), &rest[2..])
            }
        }
        _ => (None, rest),
    };
    let (plural, name, sub) = match rest {
        [p] => (*p, None, None),
        [p, n] => (*p, Some(n.to_string()), None),
        [p, n, s] => (*p, Some(n.to_string()), Some(s.to_string())),
        _ => return Err(unknown()),
    };
    let t = find(plural).ok_or_else(unknown)?;
    if let Some(s) = &sub {
        let ok = (s == "status" && t.status_subresource) || (s == "finalize" && t.kind == "Namespace");
        if !ok {
            return Err(unknown());
        }
    }
    if t.namespaced && namespace.is_none() && name.is_some() {
        return Err(unknown());
    }
    Ok(Target {
        t,
        namespace,
        name,
        sub,
    })
}

fn discovery(store: &Store, segs: &[&str]) -> Option<Response> {
    let body = match segs {
        ["version"] => {
            json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-zerocopy-sim", "gitCommit": "", "gitTreeState": "clean",
            "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.24", "compiler": "gc", "platform": "linux/amd64"})
        }
        ["api"] => {
            json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]})
        }
        ["apis"] => {
            let mut groups: Vec<(String, Vec<String>)> = Vec::new();
            store.with_registry(|r| {
                for t in r.all().filter(|t| !t.group.is_empty()) {
                    match groups.iter_mut().find(|(g, _)| *g == t.group) {
                        Some((_, vs)) => vs.extend(
                            t.versions
                                .iter()
                                .filter(|v| !vs.contains(v))
                                .cloned()
                                .collect::<Vec<_>>(),
                        ),
                        None => groups.push((t.group.clone(), t.versions.clone())),
                    }
                }
            });
            json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups.iter().map(|(g, vs)| json!({
                "name": g,
                "versions": vs.iter().map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v})).collect::<Vec<_>>(),
                "preferredVersion": {"groupVersion": format!("{g}/{}", vs[0]), "version": vs[0]},
            })).collect::<Vec<_>>()})
        }
        ["apis", g] => {
            let vs: Vec<String> = store.with_registry(|r| {
                let mut vs: Vec<String> = Vec::new();
                for t in r.all().filter(|t| t.group == *g) {
                    vs.extend(
                        t.versions
                            .iter()
                            .filter(|v| !vs.contains(v))
                            .cloned()
                            .collect::<Vec<_>>(),
                    );
                }
                vs
            });
            if vs.is_empty() {
                return None;
            }
            json!({"kind": "APIGroup", "apiVersion": "v1", "name": g,
                "versions": vs.iter().map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v})).collect::<Vec<_>>(),
                "preferredVersion": {"groupVersion": format!("{g}/{}", vs[0]), "version": vs[0]}})
        }
        ["api", v] => resource_list(store, "", v)?,
        ["apis", g, v] => resource_list(store, g, v)?,
        ["openapi", "v3"] => openapi_index(store),
        ["openapi", "v3", rest @ ..] => openapi_group_version(store, &rest.join("/"))?,
        ["openapi", ..] => {
            return Some(error_response(&ApiError::new(
                404,
                "NotFound",
                "the simulator serves OpenAPI v3 only",
            )))
        }
        _ => return None,
    };
    Some(json_response(200, &body))
}

fn resource_list(store: &Store, group: &str, version: &str) -> Option<Value> {
    let resources: Vec<Value> = store.with_registry(|r| {
        r.all()
            .filter(|t| t.group == group && t.versions.iter().any(|v| v == version))
            .flat_map(|t| {
                let verbs = [
                    "create",
                    "delete",
                    "deletecollection",
                    "get",
                    "list",
                    "patch",
                    "update",
                    "watch",
                ];
                let mut out = vec![
                    json!({"name": t.plural, "singularName": t.singular, "namespaced": t.namespaced,
                    "kind": t.kind, "verbs": verbs, "shortNames": t.short_names}),
                ];
                if t.status_subresource {
                    out.push(
                        json!({"name": format!("{}/status", t.plural), "singularName": "", "namespaced": t.namespaced,
                        "kind": t.kind, "verbs": ["get", "patch", "update"]}),
                    );
                }
                out
            })
            .collect()
    });
    if resources.is_empty() {
        return None;
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}))
}

/// `/openapi/v3`: one entry per group-version, as clients discover documents.
fn openapi_index(store: &Store) -> Value {
    let mut paths = serde_json::Map::new();
    store.with_registry(|r| {
        for t in r.all() {
            for v in &t.versions {
                let key = if t.group.is_empty() {
                    format!("api/{v}")
                } else {
                    format!("apis/{}/{v}", t.group)
                };
                let url = format!("/openapi/v3/{key}?hash=sim");
                paths.insert(key, json!({"serverRelativeURL": url}));
            }
        }
    });
    json!({"paths": paths})
}

/// A group-version's OpenAPI v3 document: the operations, with the
/// `x-kubernetes-group-version-kind` and `fieldValidation` parameter kubectl
/// checks for server-side field validation. Schemas are not published
/// (clients fall back to JSON merge patch for custom resources).
fn openapi_group_version(store: &Store, gv: &str) -> Option<Value> {
    let (group, version) = match gv.split('/').collect::<Vec<_>>()[..] {
        ["api", v] => ("", v),
        ["apis", g, v] => (g, v),
        _ => return None,
    };
    let mut paths = serde_json::Map::new();
    store.with_registry(|r| {
        for t in r.all().filter(|t| t.group == group && t.versions.iter().any(|v| v == version)) {
            let prefix = if group.is_empty() { format!("/api/{version}") } else { format!("/apis/{group}/{version}") };
            let base = if t.namespaced { format!("{prefix}/namespaces/{{namespace}}/{}", t.plural) } else { format!("{prefix}/{}", t.plural) };
            let gvk = json!({"group": t.group, "version": version, "kind": t.kind});
            let params = json!([{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}},
                                {"name": "fieldManager", "in": "query", "schema": {"type": "string"}},
                                {"name": "dryRun", "in": "query", "schema": {"type": "string"}}]);
            let op = |id: &str| json!({"operationId": format!("{id}{}", t.kind), "x-kubernetes-group-version-kind": gvk, "parameters": params, "responses": {"200": {"description": "OK"}}});
            paths.insert(format!("{base}/{{name}}"), json!({"get": op("read"), "put": op("replace"), "patch": op("patch"), "delete": op("delete")}));
            paths.insert(base, json!({"get": op("list"), "post": op("create")}));
        }
    });
    if paths.is_empty() {
        return None;
    }
    Some(
        json!({"openapi": "3.0.0", "info": {"title": "Kubernetes (zerocopy-sim)", "version": "v1.33.0"}, "paths": paths, "components": {"schemas": {}}}),
    )
}

/// `pods/<name>/log`: the container's output, from the kubelet's log file.
fn pod_log(state: &ServerState, ns: &str, name: &str, container: Option<&str>) -> Response {
    let pod = match state
        .store
        .resource_type("", "pods")
        .and_then(|t| state.store.get(&t, ns, name))
    {
        Ok(p) => p,
        Err(e) => return error_response(&e),
    };
    let container = container
        .map(String::from)
        .or_else(|| pod["spec"]["containers"][0]["name"].as_str().map(String::from))
        .unwrap_or_default();
    let node = pod["spec"]["nodeName"].as_str().unwrap_or("");
    let Some(path) = state.logs.path(node, ns, name, &container) else {
        return error_response(&ApiError::bad_request(format!(
            "container {container:?} in pod {name:?} is waiting to start"
        )));
    };
    match std::fs::read(&path) {
        Ok(bytes) => (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain")], bytes).into_response(),
        Err(_) => error_response(&ApiError::bad_request(format!(
            "container {container:?} in pod {name:?} is waiting to start: no log yet"
        ))),
    }
}
