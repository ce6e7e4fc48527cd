//! The kinds the simulated API server serves: built-in ones the project touches,
//! and custom resources registered when a CustomResourceDefinition is created.

use std::collections::BTreeMap;

use serde_json::Value;

/// One served resource (group + plural), as discovery describes it.
#[derive(Clone, Debug)]
pub struct ResourceType {
    pub group: String,
    pub versions: Vec<String>,
    pub plural: String,
    pub singular: String,
    pub kind: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    /// Writes to the main endpoint keep the stored status; `/status` writes keep the rest.
    pub status_subresource: bool,
    /// CRD `openAPIV3Schema` of the served version, when there is one.
    pub schema: Option<Value>,
    pub printer_columns: Vec<PrinterColumn>,
    pub builtin: bool,
}

#[derive(Clone, Debug)]
pub struct PrinterColumn {
    pub name: String,
    pub type_: String,
    pub json_path: String,
}

/// Key of a resource type: (group, plural).
pub type TypeKey = (String, String);

impl ResourceType {
    /// Where objects of this type are stored. `events.k8s.io/v1` Events are
    /// the core Events seen through another API, as in the real server.
    pub fn key(&self) -> TypeKey {
        if self.is_events_v1() {
            return (String::new(), "events".into());
        }
        self.registry_key()
    }

    /// How the type is registered and discovered: (group, plural).
    pub fn registry_key(&self) -> TypeKey {
        (self.group.clone(), self.plural.clone())
    }

    pub fn is_events_v1(&self) -> bool {
        self.group == "events.k8s.io" && self.plural == "events"
    }

    /// `apiVersion` for objects of this type (the first served version).
    pub fn api_version(&self) -> String {
        let v = self.versions.first().map(String::as_str).unwrap_or("v1");
        if self.group.is_empty() {
            v.to_string()
        } else {
            format!("{}/{}", self.group, v)
        }
    }

    fn builtin(group: &str, version: &str, plural: &str, kind: &str, namespaced: bool, status: bool) -> Self {
        ResourceType {
            group: group.into(),
            versions: vec![version.into()],
            plural: plural.into(),
            singular: kind.to_lowercase(),
            kind: kind.into(),
            namespaced,
            short_names: vec![],
            status_subresource: status,
            schema: None,
            printer_columns: vec![],
            builtin: true,
        }
    }

    fn short(mut self, names: &[&str]) -> Self {
        self.short_names = names.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Builds the served type from a CustomResourceDefinition object.
    pub fn from_crd(crd: &Value) -> Result<Self, String> {
        let spec = crd.get("spec").ok_or("spec is required")?;
        let group = spec["group"].as_str().ok_or("spec.group is required")?.to_string();
        let names = &spec["names"];
        let plural = names["plural"]
            .as_str()
            .ok_or("spec.names.plural is required")?
            .to_string();
        let kind = names["kind"].as_str().ok_or("spec.names.kind is required")?.to_string();
        let expected = format!("{plural}.{group}");
        if crd["metadata"]["name"].as_str() != Some(expected.as_str()) {
            return Err(format!(
                "metadata.name must be spec.names.plural+\".\"+spec.group: {expected}"
            ));
        }
        let versions: Vec<&Value> = spec["versions"]
            .as_array()
            .ok_or("spec.versions is required")?
            .iter()
            .filter(|v| v["served"].as_bool().unwrap_or(false))
            .collect();
        let first = versions.first().ok_or("at least one version must be served")?;
        let printer_columns = first["additionalPrinterColumns"]
            .as_array()
            .map(|cols| {
                cols.iter()
                    .filter_map(|c| {
                        Some(PrinterColumn {
                            name: c["name"].as_str()?.to_string(),
                            type_: c["type"].as_str().unwrap_or("string").to_string(),
                            json_path: c["jsonPath"].as_str()?.to_string(),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(ResourceType {
            group,
            versions: versions
                .iter()
                .filter_map(|v| v["name"].as_str().map(String::from))
                .collect(),
            singular: names["singular"]
                .as_str()
                .map(String::from)
                .unwrap_or_else(|| kind.to_lowercase()),
            plural,
            kind,
            namespaced: spec["scope"].as_str() != Some("Cluster"),
            short_names: names["shortNames"]
                .as_array()
                .map(|a| a.iter().filter_map(|s| s.as_str().map(String::from)).collect())
                .unwrap_or_default(),
            status_subresource: first["subresources"].get("status").is_some(),
            schema: first["schema"].get("openAPIV3Schema").cloned(),
            printer_columns,
            builtin: false,
        })
    }
}

/// The built-in kinds served from the start.
pub fn builtin_types() -> Vec<ResourceType> {
    use ResourceType as R;
    vec![
        R::builtin("", "v1", "namespaces", "Namespace", false, true).short(&["ns"]),
        R::builtin("", "v1", "nodes", "Node", false, true).short(&["no"]),
        R::builtin("", "v1", "pods", "Pod", true, true).short(&["po"]),
        R::builtin("", "v1", "configmaps", "ConfigMap", true, false).short(&["cm"]),
        R::builtin("", "v1", "secrets", "Secret", true, false),
        R::builtin("", "v1", "events", "Event", true, false).short(&["ev"]),
        R::builtin("", "v1", "serviceaccounts", "ServiceAccount", true, false).short(&["sa"]),
        R::builtin("", "v1", "services", "Service", true, true).short(&["svc"]),
        R::builtin("events.k8s.io", "v1", "events", "Event", true, false).short(&["ev"]),
        R::builtin("apps", "v1", "deployments", "Deployment", true, true).short(&["deploy"]),
        R::builtin("apps", "v1", "daemonsets", "DaemonSet", true, true).short(&["ds"]),
        R::builtin("batch", "v1", "jobs", "Job", true, true),
        R::builtin("coordination.k8s.io", "v1", "leases", "Lease", true, false),
        R::builtin(
            "networking.k8s.io",
            "v1",
            "networkpolicies",
            "NetworkPolicy",
            true,
            false,
        )
        .short(&["netpol"]),
        R::builtin("rbac.authorization.k8s.io", "v1", "roles", "Role", true, false),
        R::builtin(
            "rbac.authorization.k8s.io",
            "v1",
            "rolebindings",
            "RoleBinding",
            true,
            false,
        ),
        R::builtin(
            "rbac.authorization.k8s.io",
            "v1",
            "clusterroles",
            "ClusterRole",
            false,
            false,
        ),
        R::builtin(
            "rbac.authorization.k8s.io",
            "v1",
            "clusterrolebindings",
            "ClusterRoleBinding",
            false,
            false,
        ),
        R::builtin("storage.k8s.io", "v1", "csidrivers", "CSIDriver", false, false),
        R::builtin(
            "admissionregistration.k8s.io",
            "v1",
            "validatingadmissionpolicies",
            "ValidatingAdmissionPolicy",
            false,
            true,
        ),
        R::builtin(
            "admissionregistration.k8s.io",
            "v1",
            "validatingadmissionpolicybindings",
            "ValidatingAdmissionPolicyBinding",
            false,
            false,
        ),
        R::builtin(
            "apiextensions.k8s.io",
            "v1",
            "customresourcedefinitions",
            "CustomResourceDefinition",
            false,
            true,
        )
        .short(&["crd", "crds"]),
    ]
}

/// All served types, looked up by (group, plural) or by (group, version, plural).
#[derive(Default, Debug)]
pub struct Registry {
    types: BTreeMap<TypeKey, ResourceType>,
}

impl Registry {
    pub fn with_builtins() -> Self {
        let mut r = Registry::default();
        for t in builtin_types() {
            r.insert(t);
        }
        r
    }

    pub fn insert(&mut self, t: ResourceType) {
        self.types.insert(t.registry_key(), t);
    }

    pub fn remove(&mut self, key: &TypeKey) -> Option<ResourceType> {
        self.types.remove(key)
    }

    pub fn get(&self, group: &str, plural: &str) -> Option<&ResourceType> {
        self.types.get(&(group.to_string(), plural.to_string()))
    }

    /// The type served at `group/version/plural`.
    pub fn lookup(&self, group: &str, version: &str, plural: &str) -> Option<&ResourceType> {
        self.get(group, plural)
            .filter(|t| t.versions.iter().any(|v| v == version))
    }

    pub fn by_kind(&self, api_version: &str, kind: &str) -> Option<&ResourceType> {
        let (group, version) = split_api_version(api_version);
        self.types
            .values()
            .find(|t| t.group == group && t.kind == kind && t.versions.iter().any(|v| v == version))
    }

    pub fn all(&self) -> impl Iterator<Item = &ResourceType> {
        self.types.values()
    }
}

/// `apps/v1` → ("apps", "v1"); `v1` → ("", "v1").
pub fn split_api_version(api_version: &str) -> (&str, &str) {
    match api_version.split_once('/') {
        Some((g, v)) => (g, v),
        None => ("", api_version),
    }
}
