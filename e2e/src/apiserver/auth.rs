//! Authentication: bearer tokens, each minted for one user.
//!
//! The simulator's admin token (in the kubeconfig [`super::ApiServer::write_kubeconfig`]
//! writes) is in `system:masters`, which bypasses authorization as on a real
//! cluster. A request without credentials is the admin too: kubectl does not
//! send bearer tokens over plain HTTP, and the simulator serves no TLS. Service-account tokens carry the groups and, when bound to a node,
//! the `authentication.kubernetes.io/node-name` extra that projected tokens of
//! pods on that node carry on Kubernetes 1.30+.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use axum::http::{header, HeaderMap};
use rand::Rng;
use serde::Serialize;

use super::error::ApiError;

/// The extra key a node-bound service-account token carries.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

/// Who made a request, as authenticators tell authorizers and admission.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct UserInfo {
    pub username: String,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

impl UserInfo {
    /// A plain user (tenant tests); `system:authenticated` is added.
    pub fn user(username: &str, groups: &[&str]) -> Self {
        let mut groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
        if !groups.iter().any(|g| g == "system:authenticated") {
            groups.push("system:authenticated".into());
        }
        UserInfo {
            username: username.into(),
            groups,
            extra: BTreeMap::new(),
        }
    }

    /// `system:serviceaccount:<ns>:<name>`, optionally bound to a node.
    pub fn service_account(namespace: &str, name: &str, node: Option<&str>) -> Self {
        let mut extra = BTreeMap::new();
        if let Some(n) = node {
            extra.insert(NODE_NAME_EXTRA.to_string(), vec![n.to_string()]);
        }
        UserInfo {
            username: format!("system:serviceaccount:{namespace}:{name}"),
            groups: vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{namespace}"),
                "system:authenticated".into(),
            ],
            extra,
        }
    }

    pub fn admin() -> Self {
        UserInfo::user("zerocopy-sim-admin", &["system:masters"])
    }

    /// `system:masters` bypasses authorization.
    pub fn is_superuser(&self) -> bool {
        self.groups.iter().any(|g| g == "system:masters")
    }
}

/// Tokens → users; cheap to clone.
#[derive(Clone, Default)]
pub struct Authenticator(Arc<Mutex<HashMap<String, UserInfo>>>);

impl Authenticator {
    /// A new random token for `user`.
    pub fn mint(&self, user: UserInfo) -> String {
        let token: String = rand::thread_rng()
            .sample_iter(&rand::distributions::Alphanumeric)
            .take(40)
            .map(char::from)
            .collect();
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(token.clone(), user);
        token
    }

    /// The user of the request's bearer token; 401 for an unknown token or
    /// another scheme; a request without an Authorization header is the admin.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<UserInfo, ApiError> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .unwrap_or("");
        // No credentials at all: the admin, like the kubeconfig the simulator
        // writes. kubectl (client-go) does not send bearer tokens over plain
        // HTTP, so this is how kubectl reaches the simulator.
        if headers.get(header::AUTHORIZATION).is_none() {
            return Ok(UserInfo::admin());
        }
        if token.is_empty() {
            return Err(unauthorized());
        }
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(token)
            .cloned()
            .ok_or_else(unauthorized)
    }
}

fn unauthorized() -> ApiError {
    ApiError::new(401, "Unauthorized", "Unauthorized")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn tokens_map_to_their_users_and_unknown_ones_are_401() {
        let a = Authenticator::default();
        let t = a.mint(UserInfo::service_account("zc", "agent", Some("n1")));
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, format!("Bearer {t}").parse().unwrap());
        let u = a.authenticate(&h).unwrap();
        assert_eq!(u.username, "system:serviceaccount:zc:agent");
        assert_eq!(u.extra[NODE_NAME_EXTRA], vec!["n1".to_string()]);
        assert!(u.groups.contains(&"system:serviceaccounts:zc".to_string()));
        h.insert(header::AUTHORIZATION, "Bearer nope".parse().unwrap());
        assert_eq!(a.authenticate(&h).unwrap_err().code, 401);
        h.insert(header::AUTHORIZATION, "Basic eDp5".parse().unwrap());
        assert_eq!(a.authenticate(&h).unwrap_err().code, 401);
        assert!(a.authenticate(&HeaderMap::new()).unwrap().is_superuser());
    }
}
