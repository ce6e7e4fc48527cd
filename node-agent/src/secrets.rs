//! Credentials for sources (`source.secretRef`). In a cluster the agent
//! reads a Secret only in the wrapper's own namespace and only where the
//! namespace's admin granted it (a Role with `resourceNames` bound to the
//! agent's service account; the chart grants no Secret access at all), so a
//! tenant cannot name another namespace's Secret and the agent cannot read
//! Secrets nobody shared (docs/security.md). Standalone, Secrets come from
//! `kind: Secret` documents in the same YAML files.

use std::collections::BTreeMap;

use futures_util::future::BoxFuture;

/// A Secret's keys and values.
pub type SecretData = BTreeMap<String, String>;

/// Looks up Secrets in a namespace.
pub trait SecretStore: Send + Sync {
    /// Every key of Secret `name`, or why it cannot be had (names the
    /// Secret and what to do).
    fn get<'a>(&'a self, namespace: &'a str, name: &'a str) -> BoxFuture<'a, Result<SecretData, String>>;
}

/// No Secrets: every lookup fails with a message that says so.
#[derive(Debug, Default)]
pub struct NoSecrets;

impl SecretStore for NoSecrets {
    fn get<'a>(&'a self, namespace: &'a str, name: &'a str) -> BoxFuture<'a, Result<SecretData, String>> {
        Box::pin(async move {
            Err(format!(
                "Secret {namespace}/{name} is not available: this agent has no Secrets (standalone: add a `kind: Secret` document to the YAML files)"
            ))
        })
    }
}

/// Secrets read from YAML documents (standalone).
#[derive(Debug, Default, Clone)]
pub struct StaticSecrets {
    /// `(namespace, name)` → key → value.
    pub secrets: BTreeMap<(String, String), SecretData>,
}

impl StaticSecrets {
    /// Adds a `kind: Secret` object (its `data`, base64, and `stringData`).
    pub fn insert(
        &mut self,
        default_namespace: &str,
        secret: &k8s_openapi::api::core::v1::Secret,
    ) -> Result<(), String> {
        let name = secret.metadata.name.clone().ok_or("a Secret without metadata.name")?;
        let namespace = secret
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| default_namespace.to_string());
        let mut values = BTreeMap::new();
        for (k, v) in secret.data.iter().flatten() {
            let text = String::from_utf8(v.0.clone())
                .map_err(|_| format!("Secret {namespace}/{name}: key {k} is not UTF-8"))?;
            values.insert(k.clone(), text);
        }
        for (k, v) in secret.string_data.iter().flatten() {
            values.insert(k.clone(), v.clone());
        }
        self.secrets.insert((namespace, name), values);
        Ok(())
    }
}

impl SecretStore for StaticSecrets {
    fn get<'a>(&'a self, namespace: &'a str, name: &'a str) -> BoxFuture<'a, Result<SecretData, String>> {
        Box::pin(async move {
            self.secrets
                .get(&(namespace.to_string(), name.to_string()))
                .cloned()
                .ok_or_else(|| {
                    format!("Secret {namespace}/{name} is not in the YAML files: add a `kind: Secret` document (metadata.name: {name}) with stringData")
                })
        })
    }
}

/// Secrets read from the API server with the agent's own identity.
#[derive(Clone)]
pub struct KubeSecrets {
    client: kube::Client,
}

impl KubeSecrets {
    /// Reads through `client` (the agent's service account).
    pub fn new(client: kube::Client) -> Self {
        Self { client }
    }
}

impl SecretStore for KubeSecrets {
    fn get<'a>(&'a self, namespace: &'a str, name: &'a str) -> BoxFuture<'a, Result<SecretData, String>> {
        Box::pin(async move {
            let api: kube::Api<k8s_openapi::api::core::v1::Secret> =
                kube::Api::namespaced(self.client.clone(), namespace);
            let found = api.get(name).await.map_err(|e| match &e {
                kube::Error::Api(s) if s.code == 403 => format!(
                    "the node agent may not read Secret {namespace}/{name}: share it with the agent first (kubectl -n {namespace} create role zerocopy-source-{name} --verb=get --resource=secrets --resource-name={name}; kubectl -n {namespace} create rolebinding zerocopy-source-{name} --role=zerocopy-source-{name} --serviceaccount=<agent namespace>:<agent service account>; docs/security.md)"
                ),
                kube::Error::Api(s) if s.code == 404 => format!("Secret {namespace}/{name} does not exist"),
                _ => format!("reading Secret {namespace}/{name}: {e}"),
            })?;
            let mut store = StaticSecrets::default();
            store.insert(namespace, &found)?;
            store.get(namespace, name).await
        })
    }
}
