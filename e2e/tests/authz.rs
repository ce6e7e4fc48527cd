//! Authentication, RBAC and ValidatingAdmissionPolicies in the simulated API
//! server, seen through the real `kube::Client`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use zerocopy_e2e::apiserver::{ApiServer, ApiServerOptions, UserInfo};

async fn server() -> (ApiServer, kube::Client) {
    let s = ApiServer::start(ApiServerOptions::default()).await.unwrap();
    let c = s.client().await.unwrap();
    (s, c)
}

fn api_error(e: kube::Error) -> kube::core::Status {
    match e {
        kube::Error::Api(s) => *s,
        other => panic!("expected an API error, got {other:?}"),
    }
}

async fn apply<K>(api: &Api<K>, name: &str, body: serde_json::Value) -> Result<K, kube::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.patch(name, &PatchParams::apply("test"), &Patch::Apply(body)).await
}

#[tokio::test]
async fn requests_without_a_known_token_are_401() {
    let (s, _) = server().await;
    let anonymous = kube::Client::try_from(kube::Config::new(s.url().parse().unwrap())).unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(anonymous, "default");
    let e = api_error(cms.list(&Default::default()).await.unwrap_err());
    assert_eq!((e.code, e.reason.as_str()), (401, "Unauthorized"));
    let forged = s.client_with_token("not-a-token").await.unwrap();
    let e = api_error(
        Api::<ConfigMap>::namespaced(forged, "default")
            .list(&Default::default())
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 401);
}

#[tokio::test]
async fn service_accounts_get_what_their_roles_grant_and_403_otherwise() {
    let (s, admin) = server().await;
    let rbac = |kind: &str, body: serde_json::Value| {
        let admin = admin.clone();
        let kind = kind.to_string();
        async move {
            let (plural, ns) = match kind.as_str() {
                "Role" => ("roles", Some("default")),
                "RoleBinding" => ("rolebindings", Some("default")),
                "ClusterRole" => ("clusterroles", None),
                _ => ("clusterrolebindings", None),
            };
            let ar = kube::api::ApiResource {
                group: "rbac.authorization.k8s.io".into(),
                version: "v1".into(),
                api_version: "rbac.authorization.k8s.io/v1".into(),
                kind: kind.clone(),
                plural: plural.into(),
            };
            let api: Api<kube::api::DynamicObject> = match ns {
                Some(n) => Api::namespaced_with(admin, n, &ar),
                None => Api::all_with(admin, &ar),
            };
            let mut body = body;
            body["apiVersion"] = json!("rbac.authorization.k8s.io/v1");
            body["kind"] = json!(kind);
            api.create(&PostParams::default(), &serde_json::from_value(body).unwrap())
                .await
                .unwrap();
        }
    };
    rbac(
        "Role",
        json!({"metadata": {"name": "leases"}, "rules": [
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "patch"]}]}),
    )
    .await;
    rbac(
        "RoleBinding",
        json!({"metadata": {"name": "leases"}, "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "leases"},
            "subjects": [{"kind": "ServiceAccount", "name": "agent", "namespace": "default"}]}),
    )
    .await;
    let agent = s
        .client_for(UserInfo::service_account("default", "agent", Some("n1")))
        .await
        .unwrap();
    let leases: Api<Lease> = Api::namespaced(agent.clone(), "default");
    let body = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "n1"}, "spec": {"holderIdentity": "n1"}});
    // Apply that would create the Lease needs `create` too.
    let e = api_error(apply(&leases, "n1", body.clone()).await.unwrap_err());
    assert_eq!((e.code, e.reason.as_str()), (403, "Forbidden"));
    assert_eq!(
        e.message,
        "leases.coordination.k8s.io \"n1\" is forbidden: User \"system:serviceaccount:default:agent\" cannot create \
         resource \"leases\" in API group \"coordination.k8s.io\" in the namespace \"default\""
    );
    // Once it exists, patch is enough.
    apply(&Api::<Lease>::namespaced(admin.clone(), "default"), "n1", body.clone())
        .await
        .unwrap();
    apply(&leases, "n1", body.clone()).await.unwrap();
    leases.get("n1").await.unwrap();
    let e = api_error(leases.list(&Default::default()).await.unwrap_err());
    assert_eq!(e.code, 403);
    assert!(e.message.contains("cannot list resource \"leases\""), "{}", e.message);
    let e = api_error(
        Api::<ConfigMap>::namespaced(agent, "kube-system")
            .get("x")
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 403);
}
