//! RBAC authorization over Roles, ClusterRoles and their bindings, as
//! kube-apiserver's RBAC authorizer decides: pure functions over a snapshot.
//!
//! - Rules match on apiGroups, resources (`x`, `x/status`, `*`, `*/status`),
//!   verbs and resourceNames; `*` matches everything in its field.
//! - A ClusterRole with an `aggregationRule` holds the rules of every
//!   ClusterRole whose labels match one of its selectors (the aggregation
//!   controller's result, computed on each decision).
//! - Subjects are User, Group and ServiceAccount.
//! - resourceNames never match a request without a name (list, watch,
//!   create); a list or watch with a `metadata.name=` field selector has
//!   that name, as in kube-apiserver's request info.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::auth::UserInfo;
use super::error::ApiError;
use super::store::{ListOptions, Store};

/// What a request asks to do, as authorizers see it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Attributes {
    pub verb: String,
    pub group: String,
    pub resource: String,
    pub subresource: String,
    /// Empty: cluster scope (or all namespaces).
    pub namespace: String,
    /// Empty: no name (collections, create).
    pub name: String,
}

impl Attributes {
    pub fn new(verb: &str, group: &str, resource: &str, namespace: &str, name: &str) -> Self {
        Attributes {
            verb: verb.into(),
            group: group.into(),
            resource: resource.into(),
            subresource: String::new(),
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    pub fn subresource(mut self, subresource: &str) -> Self {
        self.subresource = subresource.into();
        self
    }

    /// `modelreplicas/status`, or `leases`.
    fn resource_path(&self) -> String {
        if self.subresource.is_empty() {
            self.resource.clone()
        } else {
            format!("{}/{}", self.resource, self.subresource)
        }
    }

    /// The 403 a real server answers for a denied request.
    pub fn forbidden(&self, user: &UserInfo, reason: &str) -> ApiError {
        let qualified = if self.group.is_empty() {
            self.resource.clone()
        } else {
            format!("{}.{}", self.resource, self.group)
        };
        let object = if self.name.is_empty() {
            qualified
        } else {
            format!("{qualified} {:?}", self.name)
        };
        let scope = if self.namespace.is_empty() {
            "at the cluster scope".to_string()
        } else {
            format!("in the namespace {:?}", self.namespace)
        };
        let mut message = format!(
            "{object} is forbidden: User {:?} cannot {} resource {:?} in API group {:?} {scope}",
            user.username,
            self.verb,
            self.resource_path(),
            self.group
        );
        if !reason.is_empty() {
            message.push_str(": ");
            message.push_str(reason);
        }
        let mut details = json!({"group": self.group, "kind": self.resource});
        if !self.name.is_empty() {
            details["name"] = json!(self.name);
        }
        ApiError::new(403, "Forbidden", message).with_details(details)
    }
}

/// An authorization decision and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub reason: String,
}

/// The RBAC objects at one moment.
#[derive(Clone, Debug, Default)]
pub struct RbacSnapshot {
    pub roles: Vec<Value>,
    pub cluster_roles: Vec<Value>,
    pub role_bindings: Vec<Value>,
    pub cluster_role_bindings: Vec<Value>,
}

fn strs(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

fn meta<'a>(o: &'a Value, f: &str) -> &'a str {
    o["metadata"][f].as_str().unwrap_or("")
}

/// `matchLabels` and `matchExpressions` (In, NotIn, Exists, DoesNotExist) of a
/// metav1.LabelSelector against labels; an empty selector matches everything.
pub fn selector_matches(selector: &Value, labels: &BTreeMap<String, String>) -> bool {
    if let Some(m) = selector["matchLabels"].as_object() {
        if !m.iter().all(|(k, v)| labels.get(k).map(String::as_str) == v.as_str()) {
            return false;
        }
    }
    selector["matchExpressions"]
        .as_array()
        .map(|exprs| {
            exprs.iter().all(|e| {
                let key = e["key"].as_str().unwrap_or("");
                let values = strs(&e["values"]);
                let got = labels.get(key).map(String::as_str);
                match e["operator"].as_str().unwrap_or("") {
                    "In" => got.is_some_and(|g| values.contains(&g)),
                    "NotIn" => got.is_none_or(|g| !values.contains(&g)),
                    "Exists" => got.is_some(),
                    "DoesNotExist" => got.is_none(),
                    _ => false,
                }
            })
        })
        .unwrap_or(true)
}

/// An object's labels as a map.
pub fn labels_of(o: &Value) -> BTreeMap<String, String> {
    o["metadata"]["labels"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether one PolicyRule allows the request.
pub fn rule_allows(rule: &Value, a: &Attributes) -> bool {
    let any = |field: &str, want: &str| strs(&rule[field]).iter().any(|v| *v == "*" || *v == want);
    if !any("verbs", &a.verb) || !any("apiGroups", &a.group) {
        return false;
    }
    let path = a.resource_path();
    let resource_ok = strs(&rule["resources"]).iter().any(|r| {
        *r == "*" || *r == path || (!a.subresource.is_empty() && r.strip_prefix("*/") == Some(a.subresource.as_str()))
    });
    if !resource_ok {
        return false;
    }
    let names = strs(&rule["resourceNames"]);
    names.is_empty() || (!a.name.is_empty() && names.contains(&a.name.as_str()))
}

fn subject_matches(subject: &Value, user: &UserInfo, binding_ns: &str) -> bool {
    let name = subject["name"].as_str().unwrap_or("");
    match subject["kind"].as_str().unwrap_or("") {
        "User" => user.username == name,
        "Group" => user.groups.iter().any(|g| g == name),
        "ServiceAccount" => {
            let ns = subject["namespace"]
                .as_str()
                .filter(|n| !n.is_empty())
                .unwrap_or(binding_ns);
            user.username == format!("system:serviceaccount:{ns}:{name}")
        }
        _ => false,
    }
}

impl RbacSnapshot {
    /// Reads the four kinds from the store.
    pub fn from_store(store: &Store) -> Result<Self, ApiError> {
        let all = |plural: &str| -> Result<Vec<Value>, ApiError> {
            let t = store.resource_type("rbac.authorization.k8s.io", plural)?;
            Ok(store.list(&t, None, &ListOptions::default())?.0)
        };
        Ok(RbacSnapshot {
            roles: all("roles")?,
            cluster_roles: all("clusterroles")?,
            role_bindings: all("rolebindings")?,
            cluster_role_bindings: all("clusterrolebindings")?,
        })
    }

    fn cluster_role(&self, name: &str) -> Option<&Value> {
        self.cluster_roles.iter().find(|r| meta(r, "name") == name)
    }

    /// A ClusterRole's rules, aggregated ones included.
    pub fn cluster_role_rules(&self, name: &str) -> Vec<Value> {
        let Some(role) = self.cluster_role(name) else {
            return vec![];
        };
        let mut rules: Vec<Value> = role["rules"].as_array().cloned().unwrap_or_default();
        if let Some(selectors) = role["aggregationRule"]["clusterRoleSelectors"].as_array() {
            for other in &self.cluster_roles {
                if meta(other, "name") == name {
                    continue;
                }
                let labels = labels_of(other);
                if selectors.iter().any(|s| selector_matches(s, &labels)) {
                    rules.extend(other["rules"].as_array().cloned().unwrap_or_default());
                }
            }
        }
        rules
    }

    fn role_rules(&self, namespace: &str, role_ref: &Value) -> Vec<Value> {
        let name = role_ref["name"].as_str().unwrap_or("");
        match role_ref["kind"].as_str().unwrap_or("") {
            "ClusterRole" => self.cluster_role_rules(name),
            "Role" => self
                .roles
                .iter()
                .find(|r| meta(r, "namespace") == namespace && meta(r, "name") == name)
                .and_then(|r| r["rules"].as_array().cloned())
                .unwrap_or_default(),
            _ => vec![],
        }
    }

    /// The RBAC decision for `user` doing `a`.
    pub fn authorize(&self, user: &UserInfo, a: &Attributes) -> Decision {
        if user.is_superuser() {
            return Decision {
                allowed: true,
                reason: "system:masters".into(),
            };
        }
        let bound = |b: &Value, ns: &str| {
            b["subjects"]
                .as_array()
                .is_some_and(|s| s.iter().any(|s| subject_matches(s, user, ns)))
        };
        for b in &self.cluster_role_bindings {
            if bound(b, "") {
                let rules = self.role_rules("", &b["roleRef"]);
                if rules.iter().any(|r| rule_allows(r, a)) {
                    return Decision {
                        allowed: true,
                        reason: format!(
                            "RBAC: allowed by ClusterRoleBinding {:?} of ClusterRole {:?}",
                            meta(b, "name"),
                            b["roleRef"]["name"].as_str().unwrap_or("")
                        ),
                    };
                }
            }
        }
        if !a.namespace.is_empty() {
            for b in self
                .role_bindings
                .iter()
                .filter(|b| meta(b, "namespace") == a.namespace)
            {
                if bound(b, &a.namespace) {
                    let rules = self.role_rules(&a.namespace, &b["roleRef"]);
                    if rules.iter().any(|r| rule_allows(r, a)) {
                        return Decision {
                            allowed: true,
                            reason: format!(
                                "RBAC: allowed by RoleBinding {:?} of {} {:?} to {:?}",
                                format!("{}/{}", a.namespace, meta(b, "name")),
                                b["roleRef"]["kind"].as_str().unwrap_or(""),
                                b["roleRef"]["name"].as_str().unwrap_or(""),
                                user.username
                            ),
                        };
                    }
                }
            }
        }
        Decision {
            allowed: false,
            reason: String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn agent() -> UserInfo {
        UserInfo::service_account("zc", "zerocopy-node-agent", Some("n1"))
    }

    fn snapshot() -> RbacSnapshot {
        RbacSnapshot {
            roles: vec![json!({"metadata": {"name": "agent", "namespace": "zc"}, "rules": [
                {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "patch"]},
                {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch"], "resourceNames": ["settings"]},
            ]})],
            cluster_roles: vec![
                json!({"metadata": {"name": "agent"}, "rules": [
                    {"apiGroups": ["zerocopy.dev"], "resources": ["modelreplicas"], "verbs": ["get", "list", "watch"]},
                    {"apiGroups": ["zerocopy.dev"], "resources": ["modelreplicas/status"], "verbs": ["patch"]},
                ]}),
                json!({"metadata": {"name": "edit"}, "aggregationRule": {"clusterRoleSelectors": [
                    {"matchLabels": {"rbac.authorization.k8s.io/aggregate-to-edit": "true"}}]}, "rules": []}),
                json!({"metadata": {"name": "zerocopy-edit", "labels": {"rbac.authorization.k8s.io/aggregate-to-edit": "true"}},
                    "rules": [{"apiGroups": ["zerocopy.dev"], "resources": ["modeltasks"], "verbs": ["create"]}]}),
                json!({"metadata": {"name": "other", "labels": {"rbac.authorization.k8s.io/aggregate-to-view": "true"}},
                    "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["*"]}]}),
                json!({"metadata": {"name": "all-status"}, "rules": [{"apiGroups": ["*"], "resources": ["*/status"], "verbs": ["get"]}]}),
            ],
            role_bindings: vec![
                json!({"metadata": {"name": "agent", "namespace": "zc"}, "roleRef": {"kind": "Role", "name": "agent"},
                    "subjects": [{"kind": "ServiceAccount", "name": "zerocopy-node-agent", "namespace": "zc"}]}),
                json!({"metadata": {"name": "alice-edit", "namespace": "ml"}, "roleRef": {"kind": "ClusterRole", "name": "edit"},
                    "subjects": [{"kind": "User", "name": "alice"}]}),
            ],
            cluster_role_bindings: vec![
                json!({"metadata": {"name": "agent"}, "roleRef": {"kind": "ClusterRole", "name": "agent"},
                    "subjects": [{"kind": "ServiceAccount", "name": "zerocopy-node-agent", "namespace": "zc"}]}),
                json!({"metadata": {"name": "auditors"}, "roleRef": {"kind": "ClusterRole", "name": "all-status"},
                    "subjects": [{"kind": "Group", "name": "auditors"}]}),
            ],
        }
    }

    fn allowed(u: &UserInfo, a: Attributes) -> bool {
        snapshot().authorize(u, &a).allowed
    }

    #[test]
    fn bindings_grant_their_roles_rules_in_their_scope() {
        let u = agent();
        assert!(allowed(
            &u,
            Attributes::new("patch", "coordination.k8s.io", "leases", "zc", "n1")
        ));
        assert!(!allowed(
            &u,
            Attributes::new("update", "coordination.k8s.io", "leases", "zc", "n1")
        ));
        // A Role's rules apply in the binding's namespace only.
        assert!(!allowed(
            &u,
            Attributes::new("patch", "coordination.k8s.io", "leases", "other", "n1")
        ));
        // A ClusterRoleBinding's rules apply everywhere.
        assert!(allowed(
            &u,
            Attributes::new("list", "zerocopy.dev", "modelreplicas", "", "")
        ));
        assert!(allowed(
            &u,
            Attributes::new("patch", "zerocopy.dev", "modelreplicas", "ml", "r").subresource("status")
        ));
        // The status rule does not give the main resource, nor the reverse.
        assert!(!allowed(
            &u,
            Attributes::new("patch", "zerocopy.dev", "modelreplicas", "ml", "r")
        ));
        assert!(!allowed(
            &u,
            Attributes::new("get", "zerocopy.dev", "modelreplicas", "ml", "r").subresource("status")
        ));
        // Another service account of the same name elsewhere gets nothing.
        let other = UserInfo::service_account("elsewhere", "zerocopy-node-agent", None);
        assert!(!allowed(
            &other,
            Attributes::new("list", "zerocopy.dev", "modelreplicas", "", "")
        ));
        assert!(allowed(
            &UserInfo::admin(),
            Attributes::new("delete", "", "nodes", "", "n1")
        ));
    }

    #[test]
    fn resource_names_match_named_requests_only() {
        let u = agent();
        assert!(allowed(&u, Attributes::new("get", "", "configmaps", "zc", "settings")));
        assert!(!allowed(&u, Attributes::new("get", "", "configmaps", "zc", "other")));
        // A list or watch without a name never matches a resourceNames rule.
        assert!(!allowed(&u, Attributes::new("list", "", "configmaps", "zc", "")));
        assert!(!allowed(&u, Attributes::new("watch", "", "configmaps", "zc", "")));
        // With `metadata.name=settings` the request has the name.
        assert!(allowed(
            &u,
            Attributes::new("watch", "", "configmaps", "zc", "settings")
        ));
    }

    #[test]
    fn aggregated_cluster_roles_carry_the_labelled_roles_rules() {
        let alice = UserInfo::user("alice", &[]);
        assert!(allowed(
            &alice,
            Attributes::new("create", "zerocopy.dev", "modeltasks", "ml", "")
        ));
        // `other` is labelled for view only.
        assert!(!allowed(&alice, Attributes::new("create", "", "pods", "ml", "")));
        // The RoleBinding is in `ml`.
        assert!(!allowed(
            &alice,
            Attributes::new("create", "zerocopy.dev", "modeltasks", "team-b", "")
        ));
        assert_eq!(snapshot().cluster_role_rules("edit").len(), 1);
    }

    #[test]
    fn groups_and_wildcard_subresources() {
        let auditor = UserInfo::user("bob", &["auditors"]);
        assert!(allowed(
            &auditor,
            Attributes::new("get", "apps", "deployments", "x", "d").subresource("status")
        ));
        assert!(!allowed(
            &auditor,
            Attributes::new("get", "apps", "deployments", "x", "d")
        ));
        assert!(!allowed(
            &UserInfo::user("bob", &[]),
            Attributes::new("get", "apps", "deployments", "x", "d").subresource("status")
        ));
    }

    #[test]
    fn denials_read_like_kube_apiserver() {
        let e = Attributes::new("patch", "coordination.k8s.io", "leases", "zc", "n1").forbidden(&agent(), "");
        assert_eq!(e.code, 403);
        assert_eq!(
            e.message,
            "leases.coordination.k8s.io \"n1\" is forbidden: User \"system:serviceaccount:zc:zerocopy-node-agent\" \
             cannot patch resource \"leases\" in API group \"coordination.k8s.io\" in the namespace \"zc\""
        );
        assert_eq!(
            e.details.unwrap(),
            json!({"name": "n1", "group": "coordination.k8s.io", "kind": "leases"})
        );
        let e = Attributes::new("list", "", "nodes", "", "").forbidden(&agent(), "");
        assert!(e.message.starts_with("nodes is forbidden: User"), "{}", e.message);
        assert!(e
            .message
            .ends_with("cannot list resource \"nodes\" in API group \"\" at the cluster scope"));
    }
}
