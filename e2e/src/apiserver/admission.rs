//! ValidatingAdmissionPolicies (admissionregistration.k8s.io/v1), evaluated
//! with cel-rust on every create, update, patch and delete that reaches the
//! store from an HTTP request.
//!
//! Modelled: `matchConstraints` (resourceRules, excludeResourceRules,
//! namespaceSelector, objectSelector), binding `matchResources` and
//! `validationActions` (only `Deny` denies), `failurePolicy`,
//! `matchConditions`, `variables`, `validations` (message, messageExpression,
//! reason), and the CEL variables `object`, `oldObject`, `request`,
//! `namespaceObject`, `params` (always null: `paramKind` is not modelled),
//! `variables` and `authorizer` (`group/resource/subresource/namespace/name`,
//! `check(verb)`, `allowed()`, `reason()`), answered by the RBAC authorizer.
//! Not modelled: Kubernetes' CEL extension libraries beyond cel-rust's
//! standard ones (see e2e/README.md), type checking at policy creation,
//! `auditAnnotations`, warnings, and the policy's status.
//!
//! The store calls [`validate`] under its lock, so everything a decision needs
//! (policies, bindings, namespaces, RBAC) is read before the write and handed
//! over in a [`RequestContext`] for the duration of the synchronous store call.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use cel::extractors::This;
use cel::objects::{Key, Map};
use cel::{Context, ExecutionError, Program, Value as Cel};
use serde_json::{json, Value};

use super::auth::UserInfo;
use super::error::ApiError;
use super::rbac::{labels_of, selector_matches, Attributes, RbacSnapshot};
use super::store::{ListOptions, Store};
use super::types::ResourceType;

/// An admission operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    Create,
    Update,
    Delete,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Create => "CREATE",
            Operation::Update => "UPDATE",
            Operation::Delete => "DELETE",
        }
    }
}

/// One write, as admission sees it.
#[derive(Clone, Debug)]
pub struct AdmissionRequest<'a> {
    pub operation: Operation,
    pub t: &'a ResourceType,
    pub subresource: &'a str,
    pub object: Option<&'a Value>,
    pub old_object: Option<&'a Value>,
}

impl AdmissionRequest<'_> {
    fn current(&self) -> Option<&Value> {
        self.object.or(self.old_object)
    }

    fn namespace(&self) -> &str {
        self.current()
            .and_then(|o| o["metadata"]["namespace"].as_str())
            .unwrap_or("")
    }

    fn name(&self) -> &str {
        self.current()
            .and_then(|o| o["metadata"]["name"].as_str())
            .unwrap_or("")
    }
}

/// What admission needs to decide a request, read before the write.
#[derive(Clone, Debug, Default)]
pub struct RequestContext {
    pub user: UserInfo,
    pub policies: Vec<Value>,
    pub bindings: Vec<Value>,
    /// Namespace objects by name (namespaceSelector, `namespaceObject`).
    pub namespaces: BTreeMap<String, Value>,
    pub rbac: RbacSnapshot,
}

thread_local! {
    static REQUEST: RefCell<Option<Arc<RequestContext>>> = const { RefCell::new(None) };
}

/// Runs `f` (synchronous store calls) with `ctx` as the request's admission context.
pub fn with_request<R>(ctx: Option<Arc<RequestContext>>, f: impl FnOnce() -> R) -> R {
    struct Reset(Option<Arc<RequestContext>>);
    impl Drop for Reset {
        fn drop(&mut self) {
            let prev = self.0.take();
            REQUEST.with(|r| *r.borrow_mut() = prev);
        }
    }
    let prev = REQUEST.with(|r| r.replace(ctx));
    let _reset = Reset(prev);
    f()
}

/// Called by the store for each write; a no-op outside an HTTP request
/// (the simulator's own controllers) or when no policy is bound.
pub fn validate(req: &AdmissionRequest<'_>) -> Result<(), ApiError> {
    match REQUEST.with(|r| r.borrow().clone()) {
        Some(ctx) => ctx.validate(req),
        None => Ok(()),
    }
}

fn strs(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// One NamedRuleWithOperations against the request.
fn rule_matches(rule: &Value, req: &AdmissionRequest<'_>) -> bool {
    let any = |field: &str, want: &str| strs(&rule[field]).iter().any(|v| *v == "*" || *v == want);
    let version = req.t.versions.first().map(String::as_str).unwrap_or("");
    if !any("apiGroups", &req.t.group) || !any("apiVersions", version) || !any("operations", req.operation.as_str()) {
        return false;
    }
    let resource_ok = strs(&rule["resources"]).iter().any(|r| {
        let (res, sub) = r.split_once('/').unwrap_or((r, ""));
        let res_ok = res == "*" || res == req.t.plural;
        let sub_ok = sub == "*" || sub == req.subresource;
        res_ok && sub_ok
    });
    if !resource_ok {
        return false;
    }
    match rule["scope"].as_str() {
        Some("Namespaced") if !req.t.namespaced => return false,
        Some("Cluster") if req.t.namespaced => return false,
        _ => {}
    }
    let names = strs(&rule["resourceNames"]);
    names.is_empty() || names.contains(&req.name())
}

impl RequestContext {
    /// Reads policies, bindings, namespaces and RBAC; None when no policy is
    /// bound (nothing to evaluate).
    pub fn from_store(store: &Store, user: &UserInfo) -> Result<Option<Self>, ApiError> {
        let all = |group: &str, plural: &str| -> Result<Vec<Value>, ApiError> {
            let t = store.resource_type(group, plural)?;
            Ok(store.list(&t, None, &ListOptions::default())?.0)
        };
        let bindings = all("admissionregistration.k8s.io", "validatingadmissionpolicybindings")?;
        if bindings.is_empty() {
            return Ok(None);
        }
        Ok(Some(RequestContext {
            user: user.clone(),
            policies: all("admissionregistration.k8s.io", "validatingadmissionpolicies")?,
            bindings,
            namespaces: all("", "namespaces")?
                .into_iter()
                .filter_map(|n| Some((n["metadata"]["name"].as_str()?.to_string(), n)))
                .collect(),
            rbac: RbacSnapshot::from_store(store)?,
        }))
    }

    /// namespaceSelector, objectSelector, resourceRules and excludeResourceRules
    /// of a policy's matchConstraints or a binding's matchResources.
    fn resources_match(&self, m: &Value, req: &AdmissionRequest<'_>, need_rules: bool) -> bool {
        if m.is_null() {
            return !need_rules;
        }
        if let Some(sel) = m.get("namespaceSelector").filter(|s| !s.is_null()) {
            let ns = if req.t.kind == "Namespace" {
                req.current().cloned()
            } else if req.t.namespaced {
                self.namespaces.get(req.namespace()).cloned()
            } else {
                None
            };
            // Cluster-scoped objects other than Namespaces are not selected by namespace.
            if req.t.namespaced || req.t.kind == "Namespace" {
                let labels = ns.as_ref().map(labels_of).unwrap_or_default();
                if !selector_matches(sel, &labels) {
                    return false;
                }
            }
        }
        if let Some(sel) = m.get("objectSelector").filter(|s| !s.is_null()) {
            let hit = [req.object, req.old_object]
                .into_iter()
                .flatten()
                .any(|o| selector_matches(sel, &labels_of(o)));
            if !hit {
                return false;
            }
        }
        if m["excludeResourceRules"]
            .as_array()
            .is_some_and(|rules| rules.iter().any(|r| rule_matches(r, req)))
        {
            return false;
        }
        match m["resourceRules"].as_array() {
            Some(rules) => rules.iter().any(|r| rule_matches(r, req)),
            None => !need_rules,
        }
    }

    /// Every binding whose policy matches `req` is evaluated; the first denial is returned.
    pub fn validate(&self, req: &AdmissionRequest<'_>) -> Result<(), ApiError> {
        for binding in &self.bindings {
            let spec = &binding["spec"];
            let policy_name = spec["policyName"].as_str().unwrap_or("");
            let Some(policy) = self
                .policies
                .iter()
                .find(|p| p["metadata"]["name"].as_str() == Some(policy_name))
            else {
                continue;
            };
            if !strs(&spec["validationActions"]).contains(&"Deny") {
                continue;
            }
            if !self.resources_match(&policy["spec"]["matchConstraints"], req, true)
                || !self.resources_match(&spec["matchResources"], req, false)
            {
                continue;
            }
            let binding_name = binding["metadata"]["name"].as_str().unwrap_or("");
            self.evaluate(policy, req)
                .map_err(|d| d.into_error(policy_name, binding_name))?;
        }
        Ok(())
    }

    fn request_value(&self, req: &AdmissionRequest<'_>) -> Value {
        let version = req.t.versions.first().cloned().unwrap_or_default();
        let kind = json!({"group": req.t.group, "version": version, "kind": req.t.kind});
        let resource = json!({"group": req.t.group, "version": version, "resource": req.t.plural});
        json!({
            "kind": kind, "requestKind": kind,
            "resource": resource, "requestResource": resource,
            "subResource": req.subresource,
            "name": req.name(),
            "namespace": req.namespace(),
            "operation": req.operation.as_str(),
            "userInfo": {"username": self.user.username, "groups": self.user.groups, "extra": self.user.extra},
            "dryRun": false,
        })
    }

    /// The policy's decision for `req`: Ok when admitted.
    pub fn evaluate(&self, policy: &Value, req: &AdmissionRequest<'_>) -> Result<(), Denial> {
        let spec = &policy["spec"];
        let fail_closed = spec["failurePolicy"].as_str() != Some("Ignore");
        let namespace_object = if req.t.namespaced {
            self.namespaces.get(req.namespace()).cloned().unwrap_or(Value::Null)
        } else {
            Value::Null
        };
        let mut vars: BTreeMap<String, Value> = BTreeMap::from([
            ("object".to_string(), req.object.cloned().unwrap_or(Value::Null)),
            ("oldObject".to_string(), req.old_object.cloned().unwrap_or(Value::Null)),
            ("request".to_string(), self.request_value(req)),
            ("params".to_string(), Value::Null),
            ("namespaceObject".to_string(), namespace_object),
            ("variables".to_string(), json!({})),
        ]);
        let authz = Arc::new((self.rbac.clone(), self.user.clone()));
        let errored = |expr: &str, e: String| Denial {
            message: format!("expression '{expr}' resulted in error: {e}"),
            reason: "Forbidden",
        };
        for cond in spec["matchConditions"].as_array().into_iter().flatten() {
            let expr = cond["expression"].as_str().unwrap_or("");
            match eval(expr, &vars, &authz) {
                Ok(Cel::Bool(true)) => {}
                Ok(Cel::Bool(false)) => return Ok(()),
                Ok(other) => {
                    if fail_closed {
                        return Err(errored(expr, format!("expected a bool, got {other:?}")));
                    }
                    return Ok(());
                }
                Err(e) if fail_closed => return Err(errored(expr, e)),
                Err(_) => return Ok(()),
            }
        }
        // Variables in order, each seeing the ones before it; a failing one is
        // left out, so an expression that uses it fails.
        for v in spec["variables"].as_array().into_iter().flatten() {
            let (Some(name), Some(expr)) = (v["name"].as_str(), v["expression"].as_str()) else {
                continue;
            };
            if let Ok(value) = eval(expr, &vars, &authz).and_then(|c| c.json().map_err(|e| e.to_string())) {
                vars.entry("variables".into()).or_insert_with(|| json!({}))[name] = value;
            }
        }
        for check in spec["validations"].as_array().into_iter().flatten() {
            let expr = check["expression"].as_str().unwrap_or("");
            let result = eval(expr, &vars, &authz);
            let denied = match result {
                Ok(Cel::Bool(true)) => continue,
                Ok(Cel::Bool(false)) => None,
                Ok(other) => Some(format!("expected a bool, got {other:?}")),
                Err(e) => Some(e),
            };
            if let Some(e) = denied {
                if fail_closed {
                    return Err(errored(expr, e));
                }
                continue;
            }
            let message = check["messageExpression"]
                .as_str()
                .and_then(|m| match eval(m, &vars, &authz) {
                    Ok(Cel::String(s)) if !s.trim().is_empty() => Some(s.to_string()),
                    _ => None,
                })
                .or_else(|| check["message"].as_str().map(String::from))
                .unwrap_or_else(|| format!("failed expression: {expr}"));
            let reason = match check["reason"].as_str() {
                Some("Invalid") => "Invalid",
                Some("Unauthorized") => "Unauthorized",
                Some("RequestEntityTooLarge") => "RequestEntityTooLarge",
                _ => "Forbidden",
            };
            return Err(Denial { message, reason });
        }
        Ok(())
    }
}

/// Why a policy denied a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denial {
    pub message: String,
    /// Forbidden (403), Invalid (422), Unauthorized (401), RequestEntityTooLarge (413).
    pub reason: &'static str,
}

impl Denial {
    pub fn into_error(self, policy: &str, binding: &str) -> ApiError {
        let code = match self.reason {
            "Invalid" => 422,
            "Unauthorized" => 401,
            "RequestEntityTooLarge" => 413,
            _ => 403,
        };
        ApiError::new(
            code,
            self.reason,
            format!(
                "ValidatingAdmissionPolicy '{policy}' with binding '{binding}' denied request: {}",
                self.message
            ),
        )
    }
}

fn key(s: &str) -> Key {
    Key::String(Arc::new(s.to_string()))
}

fn field(map: &Cel, name: &str) -> Option<Cel> {
    match map {
        Cel::Map(m) => m.map.get(&key(name)).cloned(),
        _ => None,
    }
}

fn str_field(map: &Cel, name: &str) -> String {
    match field(map, name) {
        Some(Cel::String(s)) => s.to_string(),
        _ => String::new(),
    }
}

fn with_field(this: Cel, name: &str, value: Cel) -> Result<Cel, ExecutionError> {
    match this {
        Cel::Map(m) => {
            let mut map: HashMap<Key, Cel> = (*m.map).clone();
            map.insert(key(name), value);
            Ok(Cel::Map(Map { map: Arc::new(map) }))
        }
        other => Err(ExecutionError::function_error(
            name,
            format!("not an authorizer: {other:?}"),
        )),
    }
}

type Authz = Arc<(RbacSnapshot, UserInfo)>;

fn cel_context(vars: &BTreeMap<String, Value>, authz: &Authz) -> Result<Context<'static, 'static>, String> {
    let mut ctx = Context::default();
    for (name, v) in vars {
        ctx.add_variable(name.clone(), v).map_err(|e| e.to_string())?;
    }
    ctx.add_variable_from_value(
        "authorizer",
        Cel::Map(Map {
            map: Arc::new(HashMap::new()),
        }),
    );
    for f in ["group", "resource", "subresource", "namespace", "name"] {
        ctx.add_function(f, move |This(this): This<Cel>, v: Arc<String>| {
            with_field(this, f, Cel::String(v))
        })
        .map_err(|e| format!("{e:?}"))?;
    }
    let a = authz.clone();
    ctx.add_function("check", move |This(this): This<Cel>, verb: Arc<String>| {
        let attrs = Attributes {
            verb: verb.to_string(),
            group: str_field(&this, "group"),
            resource: str_field(&this, "resource"),
            subresource: str_field(&this, "subresource"),
            namespace: str_field(&this, "namespace"),
            name: str_field(&this, "name"),
        };
        let d = a.0.authorize(&a.1, &attrs);
        let map = HashMap::from([
            (key("allowed"), Cel::Bool(d.allowed)),
            (key("reason"), Cel::String(Arc::new(d.reason))),
        ]);
        Ok::<Cel, ExecutionError>(Cel::Map(Map { map: Arc::new(map) }))
    })
    .map_err(|e| format!("{e:?}"))?;
    ctx.add_function("allowed", |This(this): This<Cel>| match field(&this, "allowed") {
        Some(b @ Cel::Bool(_)) => Ok(b),
        _ => Err(ExecutionError::function_error(
            "allowed",
            "not an authorization decision",
        )),
    })
    .map_err(|e| format!("{e:?}"))?;
    ctx.add_function("reason", |This(this): This<Cel>| match field(&this, "reason") {
        Some(s @ Cel::String(_)) => Ok(s),
        _ => Err(ExecutionError::function_error(
            "reason",
            "not an authorization decision",
        )),
    })
    .map_err(|e| format!("{e:?}"))?;
    Ok(ctx)
}

/// Compiles and runs one CEL expression over the variables.
fn eval(expr: &str, vars: &BTreeMap<String, Value>, authz: &Authz) -> Result<Cel, String> {
    let program = Program::compile(expr).map_err(|e| format!("compilation failed: {e}"))?;
    let ctx = cel_context(vars, authz)?;
    program.execute(&ctx).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::apiserver::auth::NODE_NAME_EXTRA;
    use crate::apiserver::types::builtin_types;

    fn leases() -> ResourceType {
        builtin_types().into_iter().find(|t| t.plural == "leases").unwrap()
    }

    fn policy(validations: Value) -> Value {
        json!({"metadata": {"name": "p"}, "spec": {
            "matchConstraints": {"resourceRules": [{"apiGroups": ["coordination.k8s.io"], "apiVersions": ["*"],
                "operations": ["CREATE", "UPDATE"], "resources": ["leases"]}]},
            "variables": [{"name": "node", "expression": "request.userInfo.extra[\"authentication.kubernetes.io/node-name\"][0]"}],
            "validations": validations}})
    }

    fn ctx(user: UserInfo, p: Value) -> RequestContext {
        RequestContext {
            user,
            policies: vec![p],
            bindings: vec![
                json!({"metadata": {"name": "b"}, "spec": {"policyName": "p", "validationActions": ["Deny"]}}),
            ],
            namespaces: BTreeMap::from([(
                "zc".to_string(),
                json!({"metadata": {"name": "zc", "labels": {"team": "a"}}}),
            )]),
            rbac: RbacSnapshot {
                roles: vec![json!({"metadata": {"name": "r", "namespace": "zc"}, "rules": [
                    {"apiGroups": [""], "resources": ["pods"], "verbs": ["create"]}]})],
                role_bindings: vec![
                    json!({"metadata": {"name": "r", "namespace": "zc"}, "roleRef": {"kind": "Role", "name": "r"},
                    "subjects": [{"kind": "User", "name": "alice"}]}),
                ],
                ..Default::default()
            },
        }
    }

    fn lease(name: &str) -> Value {
        json!({"metadata": {"name": name, "namespace": "zc"}, "spec": {}})
    }

    fn create<'a>(t: &'a ResourceType, obj: &'a Value) -> AdmissionRequest<'a> {
        AdmissionRequest {
            operation: Operation::Create,
            t,
            subresource: "",
            object: Some(obj),
            old_object: None,
        }
    }

    #[test]
    fn validations_see_the_object_the_user_and_variables() {
        let t = leases();
        let p = policy(json!([{"expression": "object.metadata.name == variables.node",
            "messageExpression": "'only Lease ' + variables.node", "reason": "Invalid"}]));
        let agent = UserInfo::service_account("zc", "agent", Some("n1"));
        let c = ctx(agent, p);
        c.validate(&create(&t, &lease("n1"))).unwrap();
        let e = c.validate(&create(&t, &lease("n2"))).unwrap_err();
        assert_eq!((e.code, e.reason), (422, "Invalid"));
        assert_eq!(
            e.message,
            "ValidatingAdmissionPolicy 'p' with binding 'b' denied request: only Lease n1"
        );
        // Not matched: DELETE is not in the operations.
        let old = lease("n2");
        c.validate(&AdmissionRequest {
            operation: Operation::Delete,
            t: &t,
            subresource: "",
            object: None,
            old_object: Some(&old),
        })
        .unwrap();
    }

    #[test]
    fn an_expression_error_denies_under_failure_policy_fail() {
        let t = leases();
        // No node claim: the variable fails, and so does the validation using it.
        let unbound = UserInfo::service_account("zc", "agent", None);
        let p = policy(json!([{"expression": "object.metadata.name == variables.node"}]));
        let e = ctx(unbound.clone(), p.clone())
            .validate(&create(&t, &lease("n1")))
            .unwrap_err();
        assert_eq!(e.code, 403);
        assert!(
            e.message.starts_with("ValidatingAdmissionPolicy 'p' with binding 'b' denied request: expression 'object.metadata.name == variables.node' resulted in error"),
            "{}",
            e.message
        );
        let broken = policy(json!([{"expression": "object.spec.missing.field == 1"}]));
        assert_eq!(
            ctx(unbound.clone(), broken.clone())
                .validate(&create(&t, &lease("n1")))
                .unwrap_err()
                .code,
            403
        );
        let mut ignore = broken;
        ignore["spec"]["failurePolicy"] = json!("Ignore");
        ctx(unbound.clone(), ignore)
            .validate(&create(&t, &lease("n1")))
            .unwrap();
        // A guard written with `in` gives the policy's own message instead.
        let guarded = policy(
            json!([{"expression": format!("'{NODE_NAME_EXTRA}' in request.userInfo.extra"),
            "message": "needs a node-bound token"}]),
        );
        let e = ctx(unbound, guarded).validate(&create(&t, &lease("n1"))).unwrap_err();
        assert!(
            e.message.ends_with("denied request: needs a node-bound token"),
            "{}",
            e.message
        );
    }

    #[test]
    fn the_authorizer_answers_with_rbac_and_match_conditions_select() {
        let t = leases();
        let mut p = policy(json!([{"expression":
            "authorizer.group('').resource('pods').namespace(request.namespace).check('create').allowed()",
            "message": "needs pods create"}]));
        p["spec"]["matchConditions"] =
            json!([{"name": "not-admin", "expression": "!('system:masters' in request.userInfo.groups)"}]);
        let obj = lease("x");
        ctx(UserInfo::user("alice", &[]), p.clone())
            .validate(&create(&t, &obj))
            .unwrap();
        let e = ctx(UserInfo::user("bob", &[]), p.clone())
            .validate(&create(&t, &obj))
            .unwrap_err();
        assert!(e.message.ends_with("needs pods create"), "{}", e.message);
        // The match condition leaves admins out (they would pass anyway).
        ctx(UserInfo::admin(), p.clone()).validate(&create(&t, &obj)).unwrap();
        // A binding's namespaceSelector narrows where the policy applies.
        let mut c = ctx(UserInfo::user("bob", &[]), p);
        c.bindings[0]["spec"]["matchResources"] = json!({"namespaceSelector": {"matchLabels": {"team": "b"}}});
        c.validate(&create(&t, &obj)).unwrap();
    }

    #[test]
    fn status_rules_match_the_subresource_only() {
        let t = builtin_types().into_iter().find(|t| t.plural == "pods").unwrap();
        let rule =
            json!({"apiGroups": [""], "apiVersions": ["v1"], "operations": ["UPDATE"], "resources": ["pods/status"]});
        let obj = json!({"metadata": {"name": "p", "namespace": "zc"}});
        let mut req = AdmissionRequest {
            operation: Operation::Update,
            t: &t,
            subresource: "status",
            object: Some(&obj),
            old_object: Some(&obj),
        };
        assert!(rule_matches(&rule, &req));
        req.subresource = "";
        assert!(!rule_matches(&rule, &req));
        assert!(rule_matches(
            &json!({"apiGroups": ["*"], "apiVersions": ["*"], "operations": ["*"], "resources": ["*"]}),
            &req
        ));
    }
}
