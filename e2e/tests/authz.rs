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
async fn requests_with_an_unknown_token_are_401() {
    let (s, _) = server().await;
    let forged = s.client_with_token("not-a-token").await.unwrap();
    let e = api_error(
        Api::<ConfigMap>::namespaced(forged, "default")
            .list(&Default::default())
            .await
            .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (401, "Unauthorized"));
    // Without credentials (kubectl over plain HTTP): the admin.
    let anonymous = kube::Client::try_from(kube::Config::new(s.url().parse().unwrap())).unwrap();
    Api::<ConfigMap>::namespaced(anonymous, "default")
        .list(&Default::default())
        .await
        .unwrap();
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

#[tokio::test]
async fn validating_admission_policies_deny_over_http() {
    let (_s, admin) = server().await;
    let dynamic = |kind: &str, plural: &str| {
        let ar = kube::api::ApiResource {
            group: "admissionregistration.k8s.io".into(),
            version: "v1".into(),
            api_version: "admissionregistration.k8s.io/v1".into(),
            kind: kind.into(),
            plural: plural.into(),
        };
        Api::<kube::api::DynamicObject>::all_with(admin.clone(), &ar)
    };
    let create = |api: Api<kube::api::DynamicObject>, body: serde_json::Value| async move {
        api.create(&PostParams::default(), &serde_json::from_value(body).unwrap())
            .await
            .unwrap();
    };
    create(
        dynamic("ValidatingAdmissionPolicy", "validatingadmissionpolicies"),
        json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
            "metadata": {"name": "cm-size"}, "spec": {"failurePolicy": "Fail",
            "matchConstraints": {"resourceRules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE", "UPDATE"], "resources": ["configmaps"]}]},
            "validations": [
                {"expression": "size(object.data) <= 2", "message": "at most two keys", "reason": "Invalid"},
                {"expression": "object.data.mode == 'x' || object.data.missing == 'y'"}]}}),
    )
    .await;
    create(
        dynamic("ValidatingAdmissionPolicyBinding", "validatingadmissionpolicybindings"),
        json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": "cm-size"}, "spec": {"policyName": "cm-size", "validationActions": ["Deny"]}}),
    )
    .await;
    let cms: Api<ConfigMap> = Api::namespaced(admin, "default");
    let cm = |data: serde_json::Value| {
        serde_json::from_value::<ConfigMap>(json!({"metadata": {"name": "c"}, "data": data})).unwrap()
    };
    let e = api_error(
        cms.create(&PostParams::default(), &cm(json!({"a": "1", "b": "2", "mode": "x"})))
            .await
            .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (422, "Invalid"));
    assert_eq!(
        e.message,
        "ValidatingAdmissionPolicy 'cm-size' with binding 'cm-size' denied request: at most two keys"
    );
    // No `missing` key: the expression errors, and failurePolicy Fail denies.
    let e = api_error(
        cms.create(&PostParams::default(), &cm(json!({"mode": "z"})))
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 403);
    assert!(e.message.contains("resulted in error"), "{}", e.message);
    cms.create(&PostParams::default(), &cm(json!({"mode": "x"})))
        .await
        .unwrap();
    // Patches are checked on the patched object.
    let e = api_error(
        cms.patch(
            "c",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"a": "1", "b": "2"}})),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(e.code, 422);
}
