//! Conformance-style tests of the simulated API server with the real
//! `kube::Client`: the behaviour the operator and node agents rely on.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{CustomResource, CustomResourceExt, Resource, ResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;
use zerocopy_e2e::apiserver::{ApiServer, ApiServerOptions, FaultConfig, FaultKind};

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, JsonSchema, PartialEq)]
#[kube(
    group = "test.zerocopy.dev",
    version = "v1",
    kind = "Widget",
    namespaced,
    status = "WidgetStatus"
)]
#[kube(printcolumn = r#"{"name":"Size","type":"integer","jsonPath":".spec.size"}"#)]
pub struct WidgetSpec {
    #[schemars(range(min = 1, max = 10))]
    size: i64,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, JsonSchema, PartialEq)]
pub struct WidgetStatus {
    observed: i64,
}

async fn server(opts: ApiServerOptions) -> (ApiServer, kube::Client) {
    let s = ApiServer::start(opts).await.unwrap();
    let c = s.client().await.unwrap();
    (s, c)
}

async fn with_widgets(client: &kube::Client) -> Api<Widget> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.create(&PostParams::default(), &Widget::crd()).await.unwrap();
    Api::namespaced(client.clone(), "default")
}

fn cm(name: &str, labels: &[(&str, &str)]) -> ConfigMap {
    let mut c = ConfigMap::default();
    c.metadata.name = Some(name.into());
    c.metadata.labels = Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
    c.data = Some(BTreeMap::from([("k".to_string(), "v".to_string())]));
    c
}

#[tokio::test]
async fn crud_with_optimistic_concurrency() {
    let (_s, client) = server(ApiServerOptions::default()).await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    let created = cms.create(&PostParams::default(), &cm("a", &[])).await.unwrap();
    assert!(created.metadata.uid.is_some());
    let err = cms.create(&PostParams::default(), &cm("a", &[])).await.unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref e) if e.code == 409 && e.reason == "AlreadyExists"),
        "{err}"
    );

    let mut first = cms.get("a").await.unwrap();
    first.data = Some(BTreeMap::from([("k".to_string(), "v2".to_string())]));
    let updated = cms.replace("a", &PostParams::default(), &first).await.unwrap();
    assert_ne!(updated.metadata.resource_version, first.metadata.resource_version);
    // The same (now stale) version again: 409 Conflict.
    let err = cms.replace("a", &PostParams::default(), &first).await.unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref e) if e.code == 409 && e.reason == "Conflict"),
        "{err}"
    );

    let patched = cms
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"extra": "1"}})),
        )
        .await
        .unwrap();
    assert_eq!(patched.data.unwrap().len(), 2);
    let jp: json_patch::Patch = serde_json::from_value(json!([{"op": "remove", "path": "/data/extra"}])).unwrap();
    let patched = cms
        .patch("a", &PatchParams::default(), &Patch::<()>::Json(jp))
        .await
        .unwrap();
    assert_eq!(patched.data.unwrap().len(), 1);

    cms.delete("a", &DeleteParams::default()).await.unwrap();
    let err = cms.get("a").await.unwrap_err();
    assert!(matches!(err, kube::Error::Api(ref e) if e.code == 404), "{err}");
}

#[tokio::test]
async fn label_selectors_and_pagination() {
    let (_s, client) = server(ApiServerOptions::default()).await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    for (n, labels) in [
        ("a", vec![("tier", "web"), ("zone", "x")]),
        ("b", vec![("tier", "db")]),
        ("c", vec![("zone", "y")]),
        ("d", vec![]),
    ] {
        cms.create(&PostParams::default(), &cm(n, &labels)).await.unwrap();
    }
    let names = |sel: &'static str| {
        let cms = cms.clone();
        async move {
            let l = cms.list(&ListParams::default().labels(sel)).await.unwrap();
            l.items.iter().map(|c| c.name_any()).collect::<Vec<_>>().join(",")
        }
    };
    assert_eq!(names("tier").await, "a,b");
    assert_eq!(names("!tier").await, "c,d");
    assert_eq!(
        names("tier!=web").await,
        "b,c,d",
        "!= also matches objects without the key"
    );
    assert_eq!(names("zone in (x,y),tier notin (db)").await, "a,c");
    assert_eq!(names("tier=web,zone=y").await, "");
    let err = cms
        .list(&ListParams::default().labels("tier in web"))
        .await
        .unwrap_err();
    assert!(matches!(err, kube::Error::Api(ref e) if e.code == 400), "{err}");
    let by_name = cms
        .list(&ListParams::default().fields("metadata.name=c"))
        .await
        .unwrap();
    assert_eq!(by_name.items.len(), 1);

    let page = cms.list(&ListParams::default().limit(3)).await.unwrap();
    assert_eq!(page.items.len(), 3);
    let token = page.metadata.continue_.clone().unwrap();
    let rest = cms
        .list(&ListParams::default().limit(3).continue_token(&token))
        .await
        .unwrap();
    assert_eq!(rest.items.iter().map(|c| c.name_any()).collect::<Vec<_>>(), vec!["d"]);
    assert!(rest.metadata.continue_.is_none());
}

#[tokio::test]
async fn watch_resumes_from_a_version_and_expired_versions_are_gone() {
    let (_s, client) = server(ApiServerOptions {
        history: 5,
        ..Default::default()
    })
    .await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    let a = cms.create(&PostParams::default(), &cm("a", &[])).await.unwrap();
    let rv_a = a.resource_version().unwrap();
    cms.create(&PostParams::default(), &cm("b", &[])).await.unwrap();
    cms.create(&PostParams::default(), &cm("c", &[])).await.unwrap();

    // A watch from a's version replays what came after it, then goes on live.
    let mut stream = cms
        .watch(&WatchParams::default().timeout(5), &rv_a)
        .await
        .unwrap()
        .boxed();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        if let WatchEvent::Added(c) = stream.try_next().await.unwrap().unwrap() {
            seen.push(c.name_any());
        }
    }
    assert_eq!(seen, vec!["b", "c"]);
    cms.delete("b", &DeleteParams::default()).await.unwrap();
    loop {
        match stream.try_next().await.unwrap().unwrap() {
            WatchEvent::Deleted(c) => {
                assert_eq!(c.name_any(), "b");
                break;
            }
            WatchEvent::Bookmark(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    drop(stream);

    // Push a's version out of the bounded history: resuming from it is 410 Gone.
    for i in 0..8 {
        cms.create(&PostParams::default(), &cm(&format!("x{i}"), &[]))
            .await
            .unwrap();
    }
    let mut stream = cms
        .watch(&WatchParams::default().timeout(5), &rv_a)
        .await
        .unwrap()
        .boxed();
    match stream.try_next().await.unwrap().unwrap() {
        WatchEvent::Error(e) => assert_eq!(e.code, 410),
        other => panic!("expected 410, got {other:?}"),
    }
}

#[tokio::test]
async fn watcher_survives_cut_streams_and_errors() {
    let (s, client) = server(ApiServerOptions {
        history: 20,
        ..Default::default()
    })
    .await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client.clone());
    s.faults.set(FaultConfig {
        error_rate: 0.2,
        cut_watches_within: Some(Duration::from_millis(300)),
        ..Default::default()
    });
    let names = Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
    let seen = names.clone();
    let task = tokio::spawn(async move {
        let cms: Api<ConfigMap> = Api::default_namespaced(client);
        let mut stream = watcher(cms, watcher::Config::default())
            .default_backoff()
            .applied_objects()
            .boxed();
        loop {
            if let Ok(Some(c)) = stream.try_next().await {
                seen.lock().unwrap().insert(c.name_any());
            }
        }
    });
    for i in 0..40 {
        let name = format!("w{i}");
        // Writes may hit injected faults: retry as a client would.
        while cms.create(&PostParams::default(), &cm(&name, &[])).await.is_err() && cms.get(&name).await.is_err() {}
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while names.lock().unwrap().len() < 40 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    task.abort();
    assert_eq!(
        names.lock().unwrap().len(),
        40,
        "the watcher saw every object despite cut streams and 410s"
    );
}

#[tokio::test]
async fn server_side_apply_conflicts_and_force() {
    let (_s, client) = server(ApiServerOptions::default()).await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    let apply = |data: serde_json::Value| json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "s"}, "data": data});
    cms.patch(
        "s",
        &PatchParams::apply("alice"),
        &Patch::Apply(apply(json!({"a": "1", "b": "1"}))),
    )
    .await
    .unwrap();
    let err = cms
        .patch("s", &PatchParams::apply("bob"), &Patch::Apply(apply(json!({"a": "2"}))))
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref e) if e.code == 409 && e.message.contains("alice")),
        "{err}"
    );
    let forced = cms
        .patch(
            "s",
            &PatchParams::apply("bob").force(),
            &Patch::Apply(apply(json!({"a": "2"}))),
        )
        .await
        .unwrap();
    assert_eq!(forced.data.as_ref().unwrap()["a"], "2");
    // alice drops b from her configuration: b goes; a now belongs to bob and stays.
    let after = cms
        .patch("s", &PatchParams::apply("alice"), &Patch::Apply(apply(json!({}))))
        .await
        .unwrap();
    assert_eq!(
        after.data.unwrap(),
        BTreeMap::from([("a".to_string(), "2".to_string())])
    );
    let managers: Vec<String> = after
        .metadata
        .managed_fields
        .unwrap()
        .iter()
        .filter_map(|m| m.manager.clone())
        .collect();
    assert!(managers.contains(&"bob".to_string()));
}

#[tokio::test]
async fn finalizers_block_deletion_and_gc_removes_children() {
    let (s, client) = server(ApiServerOptions::default()).await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    let mut parent = cm("parent", &[]);
    parent.metadata.finalizers = Some(vec!["test.zerocopy.dev/hold".into()]);
    let parent = cms.create(&PostParams::default(), &parent).await.unwrap();
    let mut child = cm("child", &[]);
    child.metadata.owner_references = Some(vec![parent.controller_owner_ref(&()).unwrap()]);
    cms.create(&PostParams::default(), &child).await.unwrap();

    cms.delete("parent", &DeleteParams::default()).await.unwrap();
    let held = cms.get("parent").await.unwrap();
    assert!(
        held.metadata.deletion_timestamp.is_some(),
        "a finalizer keeps the object, marked for deletion"
    );
    // A collection pass now (not a wait for the periodic one) leaves it.
    zerocopy_e2e::apiserver::gc::collect_once(&s.store);
    assert!(
        cms.get("child").await.is_ok(),
        "the owner still exists, so its child stays"
    );

    cms.patch(
        "parent",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    assert!(
        cms.get("parent").await.is_err(),
        "removing the last finalizer deletes it"
    );
    wait_gone(&cms, "child").await;

    // Foreground: the owner stays until its children are gone.
    let owner = cms.create(&PostParams::default(), &cm("owner", &[])).await.unwrap();
    let mut kid = cm("kid", &[]);
    kid.metadata.owner_references = Some(vec![owner.controller_owner_ref(&()).unwrap()]);
    kid.metadata.finalizers = Some(vec!["test.zerocopy.dev/hold".into()]);
    cms.create(&PostParams::default(), &kid).await.unwrap();
    cms.delete("owner", &DeleteParams::foreground()).await.unwrap();
    zerocopy_e2e::apiserver::gc::collect_once(&s.store);
    assert!(cms.get("owner").await.unwrap().metadata.deletion_timestamp.is_some());
    assert!(cms.get("kid").await.unwrap().metadata.deletion_timestamp.is_some());
    cms.patch(
        "kid",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    wait_gone(&cms, "owner").await;
}

async fn wait_gone(cms: &Api<ConfigMap>, name: &str) {
    for _ in 0..100 {
        if cms.get(name).await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{name} was not garbage-collected");
}

#[tokio::test]
async fn custom_resources_validate_and_keep_generation_for_status() {
    let (_s, client) = server(ApiServerOptions::default()).await;
    let widgets = with_widgets(&client).await;
    let w = Widget::new("w", WidgetSpec { size: 3 });
    let created = widgets.create(&PostParams::default(), &w).await.unwrap();
    assert_eq!(created.metadata.generation, Some(1));

    let bad = Widget::new("bad", WidgetSpec { size: 50 });
    let err = widgets.create(&PostParams::default(), &bad).await.unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref e) if e.code == 422 && e.message.contains("spec.size")),
        "{err}"
    );

    let status = widgets
        .patch_status(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"observed": 1}})),
        )
        .await
        .unwrap();
    assert_eq!(
        status.metadata.generation,
        Some(1),
        "status writes do not bump generation"
    );
    let spec = widgets
        .patch(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"size": 4}, "status": {"observed": 99}})),
        )
        .await
        .unwrap();
    assert_eq!(spec.metadata.generation, Some(2));
    assert_eq!(spec.status.unwrap().observed, 1, "the main endpoint ignores status");

    // Unknown fields are pruned, as for any structural schema.
    let pruned = widgets
        .patch(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"bogus": true}})),
        )
        .await
        .unwrap();
    assert_eq!(pruned.metadata.generation, Some(2));
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct ReconcileError(#[from] kube::Error);

#[tokio::test]
async fn a_kube_runtime_controller_converges_and_reacts() {
    let (_s, client) = server(ApiServerOptions {
        bookmark_interval: Duration::from_millis(200),
        ..Default::default()
    })
    .await;
    let widgets = with_widgets(&client).await;
    widgets
        .create(&PostParams::default(), &Widget::new("one", WidgetSpec { size: 2 }))
        .await
        .unwrap();

    // The controller mirrors spec.size into status.observed.
    let ctl_api = widgets.clone();
    let controller = tokio::spawn(async move {
        Controller::new(ctl_api.clone(), watcher::Config::default())
            .run(
                |w: Arc<Widget>, api: Arc<Api<Widget>>| async move {
                    let body = json!({"apiVersion": "test.zerocopy.dev/v1", "kind": "Widget", "metadata": {"name": w.name_any()},
                        "status": {"observed": w.spec.size}});
                    api.patch_status(&w.name_any(), &PatchParams::apply("ctl").force(), &Patch::Apply(body)).await?;
                    Ok::<_, ReconcileError>(Action::await_change())
                },
                |_, _, _| Action::requeue(Duration::from_millis(100)),
                Arc::new(ctl_api),
            )
            .for_each(|_| async {})
            .await;
    });
    let observed = |name: &'static str, want: i64| {
        let widgets = widgets.clone();
        async move {
            for _ in 0..100 {
                if widgets.get(name).await.ok().and_then(|w| w.status).map(|s| s.observed) == Some(want) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("{name} never observed {want}");
        }
    };
    observed("one", 2).await;
    widgets
        .patch(
            "one",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"size": 7}})),
        )
        .await
        .unwrap();
    observed("one", 7).await;
    widgets
        .create(&PostParams::default(), &Widget::new("two", WidgetSpec { size: 5 }))
        .await
        .unwrap();
    observed("two", 5).await;
    controller.abort();
}

#[tokio::test]
async fn watches_filtered_by_label_see_objects_leave_the_selection() {
    let (_s, client) = server(ApiServerOptions::default()).await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    let c = cms
        .create(&PostParams::default(), &cm("m", &[("sel", "yes")]))
        .await
        .unwrap();
    let mut stream = cms
        .watch(
            &WatchParams::default().labels("sel=yes").timeout(5),
            &c.resource_version().unwrap(),
        )
        .await
        .unwrap()
        .boxed();
    cms.patch(
        "m",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"sel": "no"}}})),
    )
    .await
    .unwrap();
    match stream.try_next().await.unwrap().unwrap() {
        WatchEvent::Deleted(o) => assert_eq!(o.name_any(), "m"),
        other => panic!("expected DELETED when the object leaves the selector, got {other:?}"),
    }
    let _ = Widget::api_resource();
}

#[tokio::test]
async fn gc_needs_the_owners_group_kind_name_and_uid() {
    let (_s, client) = server(ApiServerOptions::default()).await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client.clone());
    let parent = cms.create(&PostParams::default(), &cm("parent", &[])).await.unwrap();
    let uid = parent.uid().unwrap();
    let with_owner = |name: &str, api_version: &str, kind: &str, owner: &str| {
        let mut c = cm(name, &[]);
        c.metadata.owner_references = Some(vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
            api_version: api_version.into(),
            kind: kind.into(),
            name: owner.into(),
            uid: uid.clone(),
            ..Default::default()
        }]);
        c
    };
    // Only the first names its owner fully; each other one gets one thing wrong.
    let cases = [
        ("ok", "v1", "ConfigMap", "parent"),
        ("wrong-name", "v1", "ConfigMap", "someone-else"),
        ("wrong-kind", "v1", "Secret", "parent"),
        ("wrong-group", "apps/v1", "Deployment", "parent"),
        // A kind the server does not serve cannot be judged: kept.
        ("unknown-kind", "example.com/v1", "Thing", "parent"),
    ];
    for (name, api_version, kind, owner) in cases {
        cms.create(&PostParams::default(), &with_owner(name, api_version, kind, owner))
            .await
            .unwrap();
    }
    // A namespaced owner is looked up in the dependent's namespace only.
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let mut other = k8s_openapi::api::core::v1::Namespace::default();
    other.metadata.name = Some("other".into());
    namespaces.create(&PostParams::default(), &other).await.unwrap();
    let elsewhere: Api<ConfigMap> = Api::namespaced(client, "other");
    elsewhere
        .create(
            &PostParams::default(),
            &with_owner("cross-ns", "v1", "ConfigMap", "parent"),
        )
        .await
        .unwrap();
    for name in ["wrong-name", "wrong-kind", "wrong-group"] {
        wait_gone(&cms, name).await;
    }
    wait_gone(&elsewhere, "cross-ns").await;
    assert!(
        cms.get("ok").await.is_ok(),
        "a fully matching owner keeps its dependent"
    );
    assert!(cms.get("unknown-kind").await.is_ok());
}

/// The 422 causes' field paths and messages.
fn invalid_causes(err: &kube::Error) -> Vec<String> {
    match err {
        kube::Error::Api(e) if e.code == 422 => vec![e.message.clone()],
        other => panic!("expected 422 Invalid, got {other}"),
    }
}

#[tokio::test]
async fn jobs_are_validated_like_batch_v1() {
    use k8s_openapi::api::batch::v1::Job;
    let (_s, client) = server(ApiServerOptions::default()).await;
    let jobs: Api<Job> = Api::default_namespaced(client);
    let job = |name: &str, pod_spec: serde_json::Value| -> Job {
        serde_json::from_value(
            json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
            "spec": {"template": {"spec": pod_spec}}}),
        )
        .unwrap()
    };
    let c = json!([{"name": "c", "image": "busybox"}]);

    // No restartPolicy: the PodSpec default (Always) is refused for a Job.
    let err = jobs
        .create(&PostParams::default(), &job("a", json!({"containers": c})))
        .await
        .unwrap_err();
    assert!(
        invalid_causes(&err)[0].contains(
            r#"spec.template.spec.restartPolicy: Unsupported value: "Always": supported values: "OnFailure", "Never""#
        ),
        "{err}"
    );
    let err = jobs
        .create(
            &PostParams::default(),
            &job(
                "b",
                json!({"restartPolicy": "Never", "containers": [{"image": "x"}, {"name": "d"}]}),
            ),
        )
        .await
        .unwrap_err();
    let msg = &invalid_causes(&err)[0];
    assert!(
        msg.contains("spec.template.spec.containers[0].name: Required value")
            && msg.contains("spec.template.spec.containers[1].image: Required value"),
        "{msg}"
    );

    // Accepted: the selector is generated from the uid and stamped on the template.
    let created = jobs
        .create(
            &PostParams::default(),
            &job("ok", json!({"restartPolicy": "OnFailure", "containers": c})),
        )
        .await
        .unwrap();
    let uid = created.metadata.uid.clone().unwrap();
    let spec = created.spec.clone().unwrap();
    assert_eq!(
        spec.selector.unwrap().match_labels.unwrap()["batch.kubernetes.io/controller-uid"],
        uid
    );
    let labels = spec.template.metadata.unwrap().labels.unwrap();
    assert_eq!(labels["batch.kubernetes.io/controller-uid"], uid);
    assert_eq!(labels["job-name"], "ok");

    // The template and the selector are immutable.
    let err = jobs
        .patch(
            "ok",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"template": {"spec": {"containers": [{"name": "c", "image": "other"}]}}}})),
        )
        .await
        .unwrap_err();
    assert!(
        invalid_causes(&err)[0].contains("spec.template: Invalid value")
            && invalid_causes(&err)[0].contains("field is immutable"),
        "{err}"
    );
    let err = jobs
        .patch(
            "ok",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"selector": {"matchLabels": {"a": "b"}}}})),
        )
        .await
        .unwrap_err();
    assert!(invalid_causes(&err)[0].contains("spec.selector"), "{err}");
    // Other fields may change.
    jobs.patch(
        "ok",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}, "spec": {"activeDeadlineSeconds": 60}})),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn injected_faults_look_like_a_real_servers() {
    let (s, client) = server(ApiServerOptions::default()).await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client.clone());
    cms.create(&PostParams::default(), &cm("f", &[])).await.unwrap();
    // A client that does not retry, to see each answer.
    let mut config = kube::Config::new(s.url().parse().unwrap());
    config.default_retry = false;
    let raw = kube::Client::try_from(config).unwrap();
    let get = || {
        let raw = raw.clone();
        async move {
            let req = axum::http::Request::get("/api/v1/namespaces/default/configmaps/f")
                .body(Vec::new())
                .unwrap();
            let resp = raw.send(req.map(Into::into)).await.unwrap();
            let (parts, body) = resp.into_parts();
            let bytes = body.collect_bytes().await.unwrap();
            (parts, serde_json::from_slice::<serde_json::Value>(&bytes).unwrap())
        }
    };
    let only = |kind: FaultKind| FaultConfig {
        error_rate: 1.0,
        kinds: vec![kind],
        timeout_after: Duration::from_millis(200),
        ..Default::default()
    };

    s.faults.set(only(FaultKind::TooManyRequests));
    let (parts, status) = get().await;
    assert_eq!(parts.status, 429);
    assert_eq!(parts.headers["retry-after"], "1");
    assert_eq!(status["reason"], "TooManyRequests");
    assert_eq!(status["details"]["retryAfterSeconds"], 1);

    s.faults.set(only(FaultKind::InternalError));
    let (parts, status) = get().await;
    assert_eq!(parts.status, 500);
    assert_eq!(status["reason"], "InternalError");

    s.faults.set(only(FaultKind::Timeout));
    let started = std::time::Instant::now();
    let (parts, status) = get().await;
    assert_eq!(parts.status, 504);
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_eq!(status["reason"], "Timeout");
    assert!(status["message"]
        .as_str()
        .unwrap()
        .starts_with("Timeout: request did not complete within requested timeout"));

    // No fault is a 409: those come from real conflicts only.
    s.faults.set(FaultConfig {
        error_rate: 1.0,
        timeout_after: Duration::from_millis(1),
        ..Default::default()
    });
    let raw_cms: Api<ConfigMap> = Api::default_namespaced(raw);
    for i in 0..60 {
        let err = raw_cms
            .patch(
                "f",
                &PatchParams::default(),
                &Patch::Merge(json!({"data": {"i": i.to_string()}})),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(err, kube::Error::Api(ref e) if [429, 500, 504].contains(&e.code)),
            "{err}"
        );
    }
    // The default client retries 429 and 504 (honouring Retry-After) but not 500.
    s.faults.set(FaultConfig {
        error_rate: 0.3,
        kinds: vec![FaultKind::TooManyRequests, FaultKind::Timeout],
        timeout_after: Duration::from_millis(50),
        ..Default::default()
    });
    for _ in 0..5 {
        cms.get("f").await.unwrap();
    }
    assert!(s.faults.injected() > 60);
}

/// A CRD with one list of each kind server-side apply knows.
fn gadget_crd() -> CustomResourceDefinition {
    serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "gadgets.test.zerocopy.dev"},
        "spec": {"group": "test.zerocopy.dev", "scope": "Namespaced",
            "names": {"plural": "gadgets", "singular": "gadget", "kind": "Gadget"},
            "versions": [{"name": "v1", "served": true, "storage": true, "schema": {"openAPIV3Schema": {
                "type": "object", "properties": {"spec": {"type": "object", "properties": {
                    // No marker: atomic, even under a name built-in kinds merge by key.
                    "containers": {"type": "array", "items": {"type": "object", "properties": {
                        "name": {"type": "string"}, "image": {"type": "string"}}}},
                    "targets": {"type": "array", "x-kubernetes-list-type": "map",
                        "x-kubernetes-list-map-keys": ["name"],
                        "items": {"type": "object", "required": ["name"], "properties": {
                            "name": {"type": "string"}, "weight": {"type": "integer"}}}},
                    "tags": {"type": "array", "x-kubernetes-list-type": "set", "items": {"type": "string"}}}}}}}}]}
    }))
    .unwrap()
}

#[tokio::test]
async fn server_side_apply_follows_the_crd_list_types() {
    use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
    let (_s, client) = server(ApiServerOptions::default()).await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.create(&PostParams::default(), &gadget_crd()).await.unwrap();
    let ar = ApiResource::from_gvk(&GroupVersionKind::gvk("test.zerocopy.dev", "v1", "Gadget"));
    let gadgets: Api<DynamicObject> = Api::namespaced_with(client, "default", &ar);
    let apply = |mgr: &'static str, force: bool, spec: serde_json::Value| {
        let gadgets = gadgets.clone();
        async move {
            let mut pp = PatchParams::apply(mgr);
            pp.force = force;
            let body = json!({"apiVersion": "test.zerocopy.dev/v1", "kind": "Gadget", "metadata": {"name": "g"}, "spec": spec});
            gadgets.patch("g", &pp, &Patch::Apply(body)).await
        }
    };
    apply(
        "alice",
        false,
        json!({"containers": [{"name": "a", "image": "x"}], "targets": [{"name": "t1", "weight": 1}], "tags": ["red"]}),
    )
    .await
    .unwrap();
    // Map and set lists: bob's elements join alice's.
    let g = apply(
        "bob",
        false,
        json!({"targets": [{"name": "t2", "weight": 2}], "tags": ["blue"]}),
    )
    .await
    .unwrap();
    assert_eq!(
        g.data["spec"]["targets"],
        json!([{"name": "t1", "weight": 1}, {"name": "t2", "weight": 2}])
    );
    assert_eq!(g.data["spec"]["tags"], json!(["red", "blue"]));
    // An atomic list is one field: another element is a conflict with its owner...
    let err = apply("bob", false, json!({"containers": [{"name": "b", "image": "y"}]}))
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref e) if e.code == 409 && e.message.contains("alice") && e.message.contains(".spec.containers")),
        "{err}"
    );
    // ...and forcing replaces the whole list.
    let bobs = json!({"containers": [{"name": "b", "image": "y"}], "targets": [{"name": "t2", "weight": 2}], "tags": ["blue"]});
    let g = apply("bob", true, bobs).await.unwrap();
    assert_eq!(g.data["spec"]["containers"], json!([{"name": "b", "image": "y"}]));
    // alice drops her target and tag: only hers go.
    let g = apply("alice", false, json!({})).await.unwrap();
    assert_eq!(g.data["spec"]["targets"], json!([{"name": "t2", "weight": 2}]));
    assert_eq!(g.data["spec"]["tags"], json!(["blue"]));
    let fields = serde_json::to_value(g.metadata.managed_fields.unwrap()).unwrap();
    let bob = fields
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["manager"] == "bob")
        .unwrap();
    assert!(bob["fieldsV1"]["f:spec"]["f:tags"].get("v:\"blue\"").is_some(), "{bob}");
    assert!(bob["fieldsV1"]["f:spec"]["f:targets"]
        .get("k:{\"name\":\"t2\"}")
        .is_some());
}

#[tokio::test]
async fn updates_own_fields_and_applies_conflict_with_them() {
    let (s, client) = server(ApiServerOptions::default()).await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    let post = PostParams {
        field_manager: Some("creator".into()),
        ..Default::default()
    };
    let created = cms.create(&post, &cm("u", &[])).await.unwrap();
    let entry = &created.metadata.managed_fields.unwrap()[0];
    assert_eq!(entry.manager.as_deref(), Some("creator"));
    assert_eq!(entry.operation.as_deref(), Some("Update"));

    let apply = |data: serde_json::Value| json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "u"}, "data": data});
    // Applying the value the creator set is no conflict; another value is.
    cms.patch("u", &PatchParams::apply("bob"), &Patch::Apply(apply(json!({"k": "v"}))))
        .await
        .unwrap();
    let err = cms
        .patch("u", &PatchParams::apply("bob"), &Patch::Apply(apply(json!({"k": "w"}))))
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref e) if e.code == 409 && e.message.contains(r#"conflict with "creator" using v1: .data.k"#)),
        "{err}"
    );

    // A merge patch takes ownership of what it changes, from appliers too.
    let patcher = PatchParams {
        field_manager: Some("patcher".into()),
        ..Default::default()
    };
    cms.patch("u", &patcher, &Patch::Merge(json!({"data": {"p": "1"}})))
        .await
        .unwrap();
    let err = cms
        .patch("u", &PatchParams::apply("bob"), &Patch::Apply(apply(json!({"p": "2"}))))
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref e) if e.code == 409 && e.message.contains("patcher")),
        "{err}"
    );
    // Without fieldManager the manager is the User-Agent's first part.
    let mut config = kube::Config::new(s.url().parse().unwrap());
    config.headers = vec![(
        axum::http::header::USER_AGENT,
        "tester/1.0 (linux/amd64)".parse().unwrap(),
    )];
    let tester: Api<ConfigMap> = Api::default_namespaced(kube::Client::try_from(config).unwrap());
    let mut plain = cms.get("u").await.unwrap();
    plain.data.as_mut().unwrap().insert("q".into(), "1".into());
    let replaced = tester.replace("u", &PostParams::default(), &plain).await.unwrap();
    let managers: Vec<(String, String)> = replaced
        .metadata
        .managed_fields
        .unwrap()
        .iter()
        .map(|m| (m.manager.clone().unwrap(), m.operation.clone().unwrap()))
        .collect();
    assert!(
        managers.contains(&("tester".to_string(), "Update".to_string())),
        "{managers:?}"
    );
    // Force takes the field; the updater left with nothing drops out.
    let forced = cms
        .patch(
            "u",
            &PatchParams::apply("bob").force(),
            &Patch::Apply(apply(json!({"k": "v", "p": "2"}))),
        )
        .await
        .unwrap();
    assert_eq!(forced.data.as_ref().unwrap()["p"], "2");
    let managers: Vec<String> = forced
        .metadata
        .managed_fields
        .unwrap()
        .iter()
        .filter_map(|m| m.manager.clone())
        .collect();
    assert!(!managers.contains(&"patcher".to_string()), "{managers:?}");
}
