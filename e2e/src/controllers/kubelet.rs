//! A simulated kubelet for one node. For each pod bound to the node it mounts
//! the pod's volumes (CSI inline volumes through the node's real CSI socket,
//! with the volume context the real kubelet sends), runs every container as a
//! local process in a private mount namespace with its volumeMounts
//! bind-mounted at their mountPaths, reports the pod's phase and container
//! states, and on deletion or completion stops the processes and unpublishes.
//!
//! Not modelled: images (the container's `command` runs on the host, so it
//! must be given), init and sidecar containers, probes, resource limits and
//! cgroups, network namespaces (pods share the host network, podIP 127.0.0.1),
//! users and security contexts, volume kinds other than csi, configMap,
//! secret, emptyDir and hostPath.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use zerocopy_node_agent::csi::client::connect;
use zerocopy_node_agent::csi::proto::node_client::NodeClient;
use zerocopy_node_agent::csi::proto::volume_capability::{access_mode, AccessMode, AccessType, MountVolume};
use zerocopy_node_agent::csi::proto::{NodePublishVolumeRequest, NodeUnpublishVolumeRequest, VolumeCapability};

use super::events;
use super::scheduler::set_condition;
use crate::apiserver::selector::FieldSelector;
use crate::apiserver::store::{now, ListOptions, Store, Sub};

/// Where one node's kubelet keeps things, and which CSI drivers it has.
#[derive(Clone, Debug)]
pub struct KubeletConfig {
    pub node: String,
    /// The kubelet root (`/var/lib/kubelet` on a real node): pod volumes live below it.
    pub kubelet_dir: PathBuf,
    /// Container logs, one directory per pod.
    pub log_dir: PathBuf,
    /// Registered CSI drivers: name → socket.
    pub csi_drivers: BTreeMap<String, PathBuf>,
}

impl KubeletConfig {
    pub fn pod_log(&self, namespace: &str, name: &str, container: &str) -> PathBuf {
        crate::apiserver::log_file(&self.log_dir, namespace, name, container)
    }
}

struct Running {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

fn meta<'a>(o: &'a Value, f: &str) -> &'a str {
    o["metadata"][f].as_str().unwrap_or("")
}

fn terminal(pod: &Value) -> bool {
    matches!(pod["status"]["phase"].as_str(), Some("Succeeded" | "Failed"))
}

/// The volume id the kubelet uses for an inline volume: `csi-` + sha256(pod uid + volume name).
pub fn inline_volume_id(pod_uid: &str, volume: &str) -> String {
    format!(
        "csi-{}",
        hex::encode(Sha256::digest(format!("{pod_uid}{volume}").as_bytes()))
    )
}

pub async fn run(store: Store, cfg: KubeletConfig, mut shutdown: watch::Receiver<bool>) {
    let mut running: HashMap<String, Running> = HashMap::new();
    let mut rx = store.subscribe();
    loop {
        let Ok(pods_t) = store.resource_type("", "pods") else {
            return;
        };
        let opts = ListOptions {
            fields: FieldSelector::parse(&format!("spec.nodeName={}", cfg.node)).unwrap_or_default(),
            ..Default::default()
        };
        let pods = store.list(&pods_t, None, &opts).map(|(p, _, _)| p).unwrap_or_default();
        running.retain(|_, r| !r.task.is_finished());
        let mut present = std::collections::HashSet::new();
        for pod in &pods {
            let uid = meta(pod, "uid").to_string();
            present.insert(uid.clone());
            let deleting = !pod["metadata"]["deletionTimestamp"].is_null();
            match running.get(&uid) {
                Some(r) if deleting => {
                    let _ = r.stop.send(true);
                }
                Some(_) => {}
                None if deleting => {
                    // Not running here (finished, or never started): clean up and let it go.
                    let (stop, stop_rx) = watch::channel(true);
                    let task = tokio::spawn(pod_task(store.clone(), cfg.clone(), pod.clone(), stop_rx, false));
                    running.insert(uid, Running { stop, task });
                }
                None if !terminal(pod) => {
                    let (stop, stop_rx) = watch::channel(false);
                    let task = tokio::spawn(pod_task(store.clone(), cfg.clone(), pod.clone(), stop_rx, true));
                    running.insert(uid, Running { stop, task });
                }
                None => {}
            }
        }
        for (uid, r) in &running {
            if !present.contains(uid) {
                // Force-deleted from the API: stop it anyway.
                let _ = r.stop.send(true);
            }
        }
        tokio::select! {
            _ = shutdown.changed() => {
                for r in running.values() {
                    let _ = r.stop.send(true);
                }
                for (_, r) in running.drain() {
                    let _ = r.task.await;
                }
                return;
            }
            _ = rx.recv() => { while rx.try_recv().is_ok() {} }
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

/// A mounted volume: its host path, and for CSI volumes what unpublish needs.
struct Mounted {
    host_path: PathBuf,
    csi: Option<(PathBuf, String)>,
}

async fn pod_task(store: Store, cfg: KubeletConfig, pod: Value, mut stop: watch::Receiver<bool>, start: bool) {
    let ns = meta(&pod, "namespace").to_string();
    let name = meta(&pod, "name").to_string();
    let uid = meta(&pod, "uid").to_string();
    let Ok(pods_t) = store.resource_type("", "pods") else {
        return;
    };
    let pod_dir = cfg.kubelet_dir.join("pods").join(&uid);
    let mut mounted: BTreeMap<String, Mounted> = BTreeMap::new();
    let mut stopped = *stop.borrow();
    if start && !stopped {
        stopped = mount_volumes(&store, &cfg, &pod, &pod_dir, &mut mounted, &mut stop).await;
        if !stopped {
            stopped = run_containers(&store, &cfg, &pod, &mounted, &mut stop).await;
        }
    }
    // Tear down: every CSI volume of the pod is unpublished, mounted by us or not
    // (a restarted kubelet does not remember what it mounted).
    for vol in pod["spec"]["volumes"].as_array().into_iter().flatten() {
        let vname = vol["name"].as_str().unwrap_or("");
        let Some(driver) = vol["csi"]["driver"].as_str() else {
            continue;
        };
        let Some(socket) = cfg.csi_drivers.get(driver) else {
            continue;
        };
        let target = csi_target(&pod_dir, vname);
        let id = mounted
            .get(vname)
            .and_then(|m| m.csi.as_ref().map(|(_, id)| id.clone()))
            .unwrap_or_else(|| inline_volume_id(&uid, vname));
        for attempt in 0..20 {
            match unpublish(socket, &id, &target).await {
                Ok(()) => break,
                Err(message) => {
                    tracing::warn!(pod = %name, volume = vname, %message, "unpublish failed; retrying");
                    if attempt == 0 {
                        events::record(
                            &store,
                            &pod,
                            "Warning",
                            "FailedUnmount",
                            &format!("UnmountVolume.TearDown failed for volume {vname:?}: {message}"),
                            "kubelet",
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
    }
    if stopped {
        // Deletion (not completion) stopped it: the pod object can go now.
        let _ = store.delete(&pods_t, &ns, &name, None, true, Some(&uid));
    }
}

fn csi_target(pod_dir: &Path, volume: &str) -> PathBuf {
    pod_dir
        .join("volumes")
        .join("kubernetes.io~csi")
        .join(volume)
        .join("mount")
}

/// Mounts every volume, retrying with backoff; returns true if stopped meanwhile.
async fn mount_volumes(
    store: &Store,
    cfg: &KubeletConfig,
    pod: &Value,
    pod_dir: &Path,
    mounted: &mut BTreeMap<String, Mounted>,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    let uid = meta(pod, "uid");
    let mut backoff = Duration::from_millis(200);
    loop {
        let mut failure = None;
        for vol in pod["spec"]["volumes"].as_array().into_iter().flatten() {
            let vname = vol["name"].as_str().unwrap_or("").to_string();
            if mounted.contains_key(&vname) {
                continue;
            }
            match mount_one(store, cfg, pod, pod_dir, uid, &vname, vol).await {
                Ok(m) => {
                    mounted.insert(vname, m);
                }
                Err(message) => {
                    failure = Some(format!("MountVolume.SetUp failed for volume {vname:?} : {message}"));
                    break;
                }
            }
        }
        let Some(message) = failure else { return false };
        events::record(store, pod, "Warning", "FailedMount", &message, "kubelet");
        tokio::select! {
            _ = stop.changed() => return true,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(4));
    }
}

async fn mount_one(
    store: &Store,
    cfg: &KubeletConfig,
    pod: &Value,
    pod_dir: &Path,
    uid: &str,
    vname: &str,
    vol: &Value,
) -> Result<Mounted, String> {
    let ns = meta(pod, "namespace");
    if let Some(driver) = vol["csi"]["driver"].as_str() {
        let socket = cfg
            .csi_drivers
            .get(driver)
            .ok_or_else(|| format!("kubernetes.io/csi: mounter.SetUpAt failed to get CSI client: driver name {driver} not found in the list of registered CSI drivers"))?;
        let csidriver = store
            .resource_type("storage.k8s.io", "csidrivers")
            .ok()
            .and_then(|t| store.get(&t, "", driver).ok());
        let pod_info = csidriver.as_ref().is_some_and(|d| d["spec"]["podInfoOnMount"] == true);
        if let Some(d) = &csidriver {
            let modes = &d["spec"]["volumeLifecycleModes"];
            if modes.is_array() && !modes.as_array().into_iter().flatten().any(|m| m == "Ephemeral") {
                return Err(format!(
                    "CSI driver {driver} does not support the Ephemeral volume lifecycle mode"
                ));
            }
        }
        let mut ctx: HashMap<String, String> = vol["csi"]["volumeAttributes"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                    .collect()
            })
            .unwrap_or_default();
        if pod_info {
            ctx.insert("csi.storage.k8s.io/pod.name".into(), meta(pod, "name").into());
            ctx.insert("csi.storage.k8s.io/pod.namespace".into(), ns.into());
            ctx.insert("csi.storage.k8s.io/pod.uid".into(), uid.into());
            ctx.insert(
                "csi.storage.k8s.io/serviceAccount.name".into(),
                pod["spec"]["serviceAccountName"].as_str().unwrap_or("default").into(),
            );
            ctx.insert("csi.storage.k8s.io/ephemeral".into(), "true".into());
        }
        let target = csi_target(pod_dir, vname);
        let id = inline_volume_id(uid, vname);
        let req = NodePublishVolumeRequest {
            volume_id: id.clone(),
            target_path: target.display().to_string(),
            readonly: vol["csi"]["readOnly"].as_bool().unwrap_or(false),
            volume_context: ctx,
            volume_capability: Some(VolumeCapability {
                access_type: Some(AccessType::Mount(MountVolume::default())),
                access_mode: Some(AccessMode {
                    mode: access_mode::Mode::SingleNodeWriter as i32,
                }),
            }),
            ..Default::default()
        };
        let channel = connect(socket)
            .await
            .map_err(|e| format!("rpc error: code = Unavailable desc = connection error: {e}"))?;
        NodeClient::new(channel)
            .node_publish_volume(req)
            .await
            .map_err(|s| format!("rpc error: code = {:?} desc = {}", s.code(), s.message()))?;
        return Ok(Mounted {
            host_path: target,
            csi: Some((socket.clone(), id)),
        });
    }
    let dir = pod_dir.join("volumes").join(vname);
    if vol.get("emptyDir").is_some() {
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        return Ok(Mounted {
            host_path: dir,
            csi: None,
        });
    }
    if let Some(p) = vol["hostPath"]["path"].as_str() {
        return Ok(Mounted {
            host_path: PathBuf::from(p),
            csi: None,
        });
    }
    let (plural, ref_name, decode) = if let Some(n) = vol["configMap"]["name"].as_str() {
        ("configmaps", n, false)
    } else if let Some(n) = vol["secret"]["secretName"].as_str() {
        ("secrets", n, true)
    } else {
        return Err("volume type not supported by the simulated kubelet".into());
    };
    let t = store.resource_type("", plural).map_err(|e| e.message)?;
    let obj = store
        .get(&t, ns, ref_name)
        .map_err(|_| format!("{plural} {ref_name:?} not found"))?;
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    for (k, v) in obj["data"].as_object().into_iter().flatten() {
        let text = v.as_str().unwrap_or("");
        let bytes = if decode {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .map_err(|e| e.to_string())?
        } else {
            text.as_bytes().to_vec()
        };
        std::fs::write(dir.join(k), bytes).map_err(|e| e.to_string())?;
    }
    Ok(Mounted {
        host_path: dir,
        csi: None,
    })
}

async fn unpublish(socket: &Path, id: &str, target: &Path) -> Result<(), String> {
    let channel = connect(socket).await.map_err(|e| e.to_string())?;
    NodeClient::new(channel)
        .node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: id.into(),
            target_path: target.display().to_string(),
        })
        .await
        .map(|_| ())
        .map_err(|s| format!("rpc error: code = {:?} desc = {}", s.code(), s.message()))
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Value of one `env` entry, resolving `valueFrom` against the pod and the store.
fn env_value(store: &Store, pod: &Value, e: &Value) -> Option<String> {
    if let Some(v) = e["value"].as_str() {
        return Some(v.to_string());
    }
    let from = &e["valueFrom"];
    if let Some(path) = from["fieldRef"]["fieldPath"].as_str() {
        return Some(match path {
            "status.podIP" | "status.hostIP" => "127.0.0.1".into(),
            p => {
                let mut cur = pod;
                for seg in p.split('.') {
                    cur = &cur[seg];
                }
                cur.as_str().unwrap_or("").to_string()
            }
        });
    }
    let ns = meta(pod, "namespace");
    for (key, plural, decode) in [
        ("configMapKeyRef", "configmaps", false),
        ("secretKeyRef", "secrets", true),
    ] {
        if let Some(name) = from[key]["name"].as_str() {
            let t = store.resource_type("", plural).ok()?;
            let obj = store.get(&t, ns, name).ok()?;
            let raw = obj["data"][from[key]["key"].as_str()?].as_str()?.to_string();
            if !decode {
                return Some(raw);
            }
            use base64::Engine;
            let bytes = base64::engine::general_purpose::STANDARD.decode(raw).ok()?;
            return String::from_utf8(bytes).ok();
        }
    }
    None
}

struct ContainerRun {
    name: String,
    child: tokio::process::Child,
    started: String,
    termination_file: PathBuf,
    log: PathBuf,
    restarts: u64,
}

fn spawn_container(
    store: &Store,
    cfg: &KubeletConfig,
    pod: &Value,
    c: &Value,
    mounted: &BTreeMap<String, Mounted>,
) -> Result<ContainerRun, String> {
    let cname = c["name"].as_str().unwrap_or("c").to_string();
    let command: Vec<String> = c["command"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(c["args"].as_array().into_iter().flatten())
        .filter_map(|v| v.as_str().map(String::from))
        .collect();
    if c["command"].as_array().is_none_or(Vec::is_empty) {
        return Err(format!("container {cname:?} has no command: the simulator runs commands on the host and cannot run image entrypoints"));
    }
    let log = cfg.pod_log(meta(pod, "namespace"), meta(pod, "name"), &cname);
    let cdir = log.parent().map(Path::to_path_buf).unwrap_or_default();
    std::fs::create_dir_all(&cdir).map_err(|e| e.to_string())?;
    let termination_file = cdir.join(format!("{cname}.termination-log"));
    std::fs::write(&termination_file, b"").map_err(|e| e.to_string())?;
    let mut script = String::from("set -e\n");
    for m in c["volumeMounts"].as_array().into_iter().flatten() {
        let vname = m["name"].as_str().unwrap_or("");
        let path = m["mountPath"].as_str().unwrap_or("");
        let Some(src) = mounted.get(vname) else {
            return Err(format!("volumeMount {vname:?} names no volume of the pod"));
        };
        let mut src_path = src.host_path.clone();
        if let Some(sub) = m["subPath"].as_str().filter(|s| !s.is_empty()) {
            src_path = src_path.join(sub);
        }
        let (src_q, dst_q) = (shell_quote(&src_path.display().to_string()), shell_quote(path));
        script.push_str(&format!("mkdir -p {dst_q}\nmount --bind {src_q} {dst_q}\n"));
        if m["readOnly"].as_bool().unwrap_or(false) {
            script.push_str(&format!("mount -o remount,bind,ro {dst_q}\n"));
        }
    }
    let tpath = c["terminationMessagePath"].as_str().unwrap_or("/dev/termination-log");
    let tq = shell_quote(tpath);
    script.push_str(&format!(
        "mkdir -p \"$(dirname {tq})\" && touch {tq} && mount --bind {} {tq} || true\n",
        shell_quote(&termination_file.display().to_string())
    ));
    if let Some(wd) = c["workingDir"].as_str() {
        script.push_str(&format!("mkdir -p {0} && cd {0}\n", shell_quote(wd)));
    }
    script.push_str("exec \"$@\"\n");
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(|e| e.to_string())?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let mut cmd = tokio::process::Command::new("unshare");
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "--",
        "/bin/sh",
        "-c",
        &script,
        "sh",
    ])
    .args(&command)
    .env_clear()
    .env(
        "PATH",
        std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()),
    )
    .env("HOME", "/root")
    .env("HOSTNAME", meta(pod, "name"))
    .stdin(Stdio::null())
    .stdout(out)
    .stderr(err)
    .process_group(0)
    .kill_on_drop(true);
    for e in c["env"].as_array().into_iter().flatten() {
        if let (Some(k), Some(v)) = (e["name"].as_str(), env_value(store, pod, e)) {
            cmd.env(k, v);
        }
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("failed to start container {cname:?}: {e}"))?;
    Ok(ContainerRun {
        name: cname,
        child,
        started: now(),
        termination_file,
        log,
        restarts: 0,
    })
}

fn stop_group(child: &tokio::process::Child, signal: nix::sys::signal::Signal) {
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid as i32), signal);
    }
}

/// Runs the containers until they end or the pod is stopped; returns true if stopped.
async fn run_containers(
    store: &Store,
    cfg: &KubeletConfig,
    pod: &Value,
    mounted: &BTreeMap<String, Mounted>,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    let ns = meta(pod, "namespace").to_string();
    let name = meta(pod, "name").to_string();
    let Ok(pods_t) = store.resource_type("", "pods") else {
        return false;
    };
    let policy = pod["spec"]["restartPolicy"].as_str().unwrap_or("Always").to_string();
    let containers: Vec<Value> = pod["spec"]["containers"].as_array().cloned().unwrap_or_default();
    let mut runs = Vec::new();
    for c in &containers {
        match spawn_container(store, cfg, pod, c, mounted) {
            Ok(r) => runs.push(r),
            Err(message) => {
                for r in &runs {
                    stop_group(&r.child, nix::sys::signal::Signal::SIGKILL);
                }
                events::record(store, pod, "Warning", "Failed", &message, "kubelet");
                let _ = store.modify(&pods_t, &ns, &name, Sub::Status, |p| {
                    p["status"]["phase"] = json!("Failed");
                    p["status"]["reason"] = json!("ContainerCannotRun");
                    p["status"]["message"] = json!(message);
                });
                return false;
            }
        }
    }
    let write_running = |runs: &[ContainerRun]| {
        let statuses: Vec<Value> = runs
            .iter()
            .zip(&containers)
            .map(|(r, c)| {
                json!({"name": r.name, "image": c["image"], "imageID": "", "ready": true, "started": true,
                "restartCount": r.restarts, "state": {"running": {"startedAt": r.started}}})
            })
            .collect();
        let _ = store.modify(&pods_t, &ns, &name, Sub::Status, |p| {
            p["status"]["phase"] = json!("Running");
            p["status"]["podIP"] = json!("127.0.0.1");
            p["status"]["hostIP"] = json!("127.0.0.1");
            if p["status"]["startTime"].is_null() {
                p["status"]["startTime"] = json!(now());
            }
            p["status"]["containerStatuses"] = json!(statuses);
            for t in ["Initialized", "ContainersReady", "Ready"] {
                set_condition(p, t, "True", "", "");
            }
        });
    };
    write_running(&runs);
    events::record(store, pod, "Normal", "Started", "Started containers", "kubelet");

    let mut finished: Vec<Option<Value>> = vec![None; runs.len()];
    loop {
        if finished.iter().all(Option::is_some) {
            break;
        }
        let mut exited = None;
        tokio::select! {
            _ = stop.changed() => {
                let grace = pod["spec"]["terminationGracePeriodSeconds"].as_u64().unwrap_or(2).min(5);
                for r in &runs {
                    stop_group(&r.child, nix::sys::signal::Signal::SIGTERM);
                }
                let deadline = tokio::time::Instant::now() + Duration::from_secs(grace);
                for r in runs.iter_mut() {
                    if tokio::time::timeout_at(deadline, r.child.wait()).await.is_err() {
                        stop_group(&r.child, nix::sys::signal::Signal::SIGKILL);
                        let _ = r.child.wait().await;
                    }
                }
                return true;
            }
            _ = tokio::time::sleep(Duration::from_millis(100)) => {
                for (i, r) in runs.iter_mut().enumerate() {
                    if finished[i].is_some() {
                        continue;
                    }
                    if let Ok(Some(status)) = r.child.try_wait() {
                        exited = Some((i, status.code().unwrap_or(137)));
                        break;
                    }
                }
            }
        }
        let Some((i, code)) = exited else { continue };
        let r = &mut runs[i];
        let restart = policy == "Always" || (policy == "OnFailure" && code != 0);
        if restart {
            events::record(
                store,
                pod,
                "Warning",
                "BackOff",
                &format!("Back-off restarting container {}", r.name),
                "kubelet",
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
            let restarts = r.restarts + 1;
            match spawn_container(store, cfg, pod, &containers[i], mounted) {
                Ok(mut fresh) => {
                    fresh.restarts = restarts;
                    runs[i] = fresh;
                    write_running(&runs);
                }
                Err(message) => {
                    finished[i] = Some(json!({"exitCode": 128, "reason": "ContainerCannotRun", "message": message}))
                }
            }
            continue;
        }
        let mut message = std::fs::read_to_string(&r.termination_file).unwrap_or_default();
        let fallback = containers[i]["terminationMessagePolicy"] == "FallbackToLogsOnError";
        if message.is_empty() && fallback && code != 0 {
            let log = std::fs::read(&r.log).unwrap_or_default();
            let tail = &log[log.len().saturating_sub(2048)..];
            message = String::from_utf8_lossy(tail).into_owned();
        }
        message.truncate(message.floor_char_boundary(4096));
        let mut term = json!({"exitCode": code, "reason": if code == 0 { "Completed" } else { "Error" },
            "startedAt": r.started, "finishedAt": now()});
        if !message.is_empty() {
            term["message"] = json!(message);
        }
        finished[i] = Some(term);
    }
    let failed = finished.iter().flatten().any(|t| t["exitCode"] != 0);
    let statuses: Vec<Value> = runs
        .iter()
        .zip(&finished)
        .zip(&containers)
        .map(|((r, t), c)| {
            json!({"name": r.name, "image": c["image"], "imageID": "", "ready": false, "started": false,
            "restartCount": r.restarts, "state": {"terminated": t}})
        })
        .collect();
    let _ = store.modify(&pods_t, &ns, &name, Sub::Status, |p| {
        p["status"]["phase"] = json!(if failed { "Failed" } else { "Succeeded" });
        p["status"]["containerStatuses"] = json!(statuses);
        for t in ["ContainersReady", "Ready"] {
            set_condition(p, t, "False", "PodCompleted", "");
        }
    });
    false
}
