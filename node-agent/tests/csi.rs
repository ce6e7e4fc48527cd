//! The CSI node plugin over its real unix socket: real bind mounts, a real
//! gRPC client acting as kubelet, SIGKILL and restart.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: panics are the failure report

mod support;

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{mounts_at, mounts_under, publish, unpublish, Agent};
use tonic::Code;
use zerocopy_integration_tests::http::{Fault, Server};
use zerocopy_integration_tests::safetensors::{file, T};
use zerocopy_integration_tests::{sha256_hex, wrapper_yaml, TmpfsDir};
use zerocopy_node_agent::csi::proto::{GetPluginInfoRequest, NodeGetCapabilitiesRequest, NodeGetInfoRequest};
use zerocopy_node_agent::supervisor::IN_USE_RECHECK;

/// Writes `n` wrappers `m0..m{n-1}` in namespace `test`, each with its own model file.
fn wrappers(dir: &Path, n: usize, floats: usize) -> std::path::PathBuf {
    let mut yaml = String::new();
    for i in 0..n {
        let body = file(&[T::f32("w", floats, i as u32)]);
        let src = dir.join(format!("m{i}.safetensors"));
        fs::write(&src, &body).unwrap();
        yaml.push_str(&format!(
            "---\napiVersion: zerocopy.dev/v1alpha1\nkind: ModelWrapper\nmetadata: {{name: m{i}, namespace: test}}\nspec:\n  pipeline:\n    components:\n      - name: enc\n        weights: {{uri: 'file://{}', sha256: '{}'}}\n",
            src.display(),
            sha256_hex(&body)
        ));
    }
    let path = dir.join("wrappers.yaml");
    fs::write(&path, yaml).unwrap();
    path
}

/// Pss in bytes of mappings of `file` in process `pid`.
fn pss_of(pid: u32, file: &Path) -> u64 {
    let smaps = fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut current = false;
    let mut total = 0;
    for line in smaps.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        if !parts[0].ends_with(':') {
            current = parts.len() >= 6 && Path::new(parts[5]) == file;
        } else if current && parts[0] == "Pss:" {
            total += parts[1].parse::<u64>().unwrap() * 1024;
        }
    }
    total
}

/// A process that maps `file` read-only, touches every page and waits.
fn mapper(file: &Path) -> std::process::Child {
    let script = "import mmap,sys\nf=open(sys.argv[1],'rb')\nm=mmap.mmap(f.fileno(),0,prot=mmap.PROT_READ)\ns=sum(m[i] for i in range(0,len(m),4096))\nprint('ready',flush=True)\nsys.stdin.readline()\n";
    let mut c = Command::new("python3")
        .args(["-c", script])
        .arg(file)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(c.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    c
}

#[tokio::test(flavor = "multi_thread")]
async fn publish_mounts_read_only_shares_pages_and_is_idempotent() {
    let tmp = TmpfsDir::new();
    let yaml = wrappers(tmp.path(), 1, 1 << 20); // 4 MiB
    let agent = Agent::start(tmp.path(), &yaml, &[]).await;
    let info = agent
        .identity()
        .await
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "csi.zerocopy.dev");
    let mut node = agent.node().await;
    assert_eq!(
        node.node_get_info(NodeGetInfoRequest {})
            .await
            .unwrap()
            .into_inner()
            .node_id,
        "node-a"
    );
    assert!(node
        .node_get_capabilities(NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities
        .is_empty());

    let target = agent.target("vol-1");
    node.node_publish_volume(publish("vol-1", &target, "m0", "test"))
        .await
        .unwrap();
    let mut names: Vec<String> = fs::read_dir(&target)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["enc.safetensors", "manifest.json"]);
    let err = fs::write(target.join("x"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(nix::errno::Errno::EROFS as i32));
    let m = zerocopy_node_agent::mount::mount_at(&target).unwrap().unwrap();
    for opt in ["ro", "nosuid", "nodev", "noexec"] {
        assert!(m.mount_options.split(',').any(|o| o == opt), "{opt} missing: {m:?}");
    }

    // a second process mapping the same file shares its pages: PSS halves
    let weights = target.join("enc.safetensors");
    let size = fs::metadata(&weights).unwrap().len();
    let mut a = mapper(&weights);
    let alone = pss_of(a.id(), &weights);
    let mut b = mapper(&weights);
    let shared = pss_of(a.id(), &weights);
    assert!(alone as f64 > 0.95 * size as f64, "alone {alone} of {size}");
    assert!(
        (shared as f64 - alone as f64 / 2.0).abs() < 0.05 * alone as f64,
        "alone {alone}, shared {shared}"
    );
    for c in [&mut a, &mut b] {
        c.stdin.take().unwrap().write_all(b"\n").unwrap();
        c.wait().unwrap();
    }

    // idempotence
    node.node_publish_volume(publish("vol-1", &target, "m0", "test"))
        .await
        .unwrap();
    assert_eq!(mounts_at(&target), 1);
    assert_eq!(agent.ledger_len(), 1);
    let metrics = agent.metrics_text().await;
    assert!(
        metrics.contains("zerocopy_csi_publish_total{result=\"ok\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("zerocopy_active_mounts{namespace=\"test\",wrapper=\"m0\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("zerocopy_bytes_resident{namespace=\"test\",wrapper=\"m0\"}"),
        "{metrics}"
    );
    node.node_unpublish_volume(unpublish("vol-1", &target)).await.unwrap();
    node.node_unpublish_volume(unpublish("vol-1", &target)).await.unwrap();
    node.node_unpublish_volume(unpublish("never-published", &agent.target("never-published")))
        .await
        .unwrap();
    assert_eq!(mounts_at(&target), 0);
    assert!(!target.exists(), "the target directory should be removed");
    assert_eq!(agent.ledger_len(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_the_right_code_a_clear_message_and_no_mount() {
    let tmp = TmpfsDir::new();
    let yaml = wrappers(tmp.path(), 1, 1000);
    let agent = Agent::start(tmp.path(), &yaml, &[]).await;
    let mut node = agent.node().await;
    let t = agent.target("v");
    let mut no_wrapper = publish("v", &t, "m0", "test");
    no_wrapper.volume_context.remove("modelWrapper");
    let mut no_namespace = publish("v", &t, "m0", "test");
    no_namespace.volume_context.remove("csi.storage.k8s.io/pod.namespace");
    let mut writable = publish("v", &t, "m0", "test");
    writable.readonly = false;
    let mut relative = publish("v", &t, "m0", "test");
    relative.target_path = "pods/x/mount".into();
    let mut traversing = publish("v", &t, "m0", "test");
    traversing.target_path = format!("{}/../../etc/x", agent.kubelet.display());
    let mut outside = publish("v", &t, "m0", "test");
    outside.target_path = tmp.path().join("elsewhere/mount").display().to_string();
    let cases = [
        (
            no_wrapper,
            Code::InvalidArgument,
            "volumeAttributes.modelWrapper is required",
        ),
        (no_namespace, Code::InvalidArgument, "podInfoOnMount: true"),
        (writable, Code::InvalidArgument, "readOnly: true"),
        (relative, Code::InvalidArgument, "must be an absolute path"),
        (traversing, Code::InvalidArgument, "'..'"),
        (outside, Code::InvalidArgument, "outside the kubelet directory"),
        (
            publish("v", &t, "m0", "other"),
            Code::NotFound,
            "ModelWrapper other/m0 not found",
        ),
        (
            publish("v", &t, "missing", "test"),
            Code::NotFound,
            "create the ModelWrapper there",
        ),
    ];
    for (req, code, says) in cases {
        let status = node.node_publish_volume(req.clone()).await.unwrap_err();
        assert_eq!(status.code(), code, "{req:?}: {status:?}");
        assert!(status.message().contains(says), "{:?} lacks {says:?}", status.message());
    }
    assert_eq!(mounts_under(&agent.kubelet), 0, "something got mounted");
    assert_eq!(agent.ledger_len(), 0);
    let status = node
        .node_unpublish_volume(unpublish("v", Path::new("relative")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let metrics = agent.metrics_text().await;
    assert!(
        metrics.contains("zerocopy_csi_publish_total{result=\"invalid\"} 6"),
        "{metrics}"
    );
    assert!(
        metrics.contains("zerocopy_csi_publish_total{result=\"not_found\"} 2"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hundred_concurrent_publishes_and_unpublishes_leave_exact_mounts() {
    let tmp = TmpfsDir::new();
    let yaml = wrappers(tmp.path(), 10, 1000);
    let agent = Agent::start(tmp.path(), &yaml, &[]).await;
    for i in 0..10 {
        agent.wait_generations("test", &format!("m{i}"), 1).await;
    }
    // every volume twice at once: one runs, the other gets ABORTED or OK
    let mut tasks = Vec::new();
    for i in 0..100 {
        for _ in 0..2 {
            let mut node = agent.node().await;
            let id = format!("vol-{i}");
            let req = publish(&id, &agent.target(&id), &format!("m{}", i % 10), "test");
            tasks.push(tokio::spawn(async move {
                (
                    id,
                    node.node_publish_volume(req).await.map(|_| ()).map_err(|s| s.code()),
                )
            }));
        }
    }
    let mut aborted = 0;
    for t in tasks {
        let (id, r) = t.await.unwrap();
        match r {
            Ok(()) => {}
            Err(Code::Aborted) => aborted += 1,
            Err(c) => panic!("{id}: unexpected {c:?}"),
        }
    }
    for i in 0..100 {
        let target = agent.target(&format!("vol-{i}"));
        assert_eq!(mounts_at(&target), 1, "vol-{i}");
        assert!(target.join("manifest.json").exists());
    }
    assert_eq!(agent.ledger_len(), 100);
    eprintln!("{aborted} of 100 duplicate publishes were ABORTED");

    let mut tasks = Vec::new();
    for i in 0..100 {
        let mut node = agent.node().await;
        let id = format!("vol-{i}");
        let req = unpublish(&id, &agent.target(&id));
        tasks.push(tokio::spawn(async move {
            node.node_unpublish_volume(req).await.map(|_| ()).map_err(|s| s.code())
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(agent.ledger_len(), 0);
    assert_eq!(mounts_under(&agent.kubelet), 0, "leaked mounts");
}

#[tokio::test(flavor = "multi_thread")]
async fn publications_survive_sigkill_and_restart() {
    let tmp = TmpfsDir::new();
    let yaml = wrappers(tmp.path(), 1, 10_000);
    let mut agent = Agent::start(tmp.path(), &yaml, &[]).await;
    let mut node = agent.node().await;
    let ids: Vec<String> = (0..5).map(|i| format!("vol-{i}")).collect();
    for id in &ids {
        node.node_publish_volume(publish(id, &agent.target(id), "m0", "test"))
            .await
            .unwrap();
    }
    let expected = fs::read(agent.target("vol-0").join("enc.safetensors")).unwrap();
    agent.sigkill();
    for id in &ids {
        assert_eq!(mounts_at(&agent.target(id)), 1);
        assert_eq!(
            fs::read(agent.target(id).join("enc.safetensors")).unwrap(),
            expected,
            "mount stopped serving while the agent was down"
        );
    }
    agent.spawn().await;
    let metrics = agent.metrics_text().await;
    assert!(
        metrics.contains("zerocopy_active_mounts{namespace=\"test\",wrapper=\"m0\"} 5"),
        "ledger not recovered: {metrics}"
    );
    let mut node = agent.node().await;
    node.node_publish_volume(publish("vol-0", &agent.target("vol-0"), "m0", "test"))
        .await
        .unwrap();
    assert_eq!(mounts_at(&agent.target("vol-0")), 1);
    for id in &ids {
        node.node_unpublish_volume(unpublish(id, &agent.target(id)))
            .await
            .unwrap();
        assert_eq!(mounts_at(&agent.target(id)), 0);
    }
    assert_eq!(agent.ledger_len(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_publish_during_a_fill_reports_progress_then_succeeds() {
    let tmp = TmpfsDir::new();
    let server = Server::start(Fault::Slow);
    let body = file(&[T::f32("w", 1_500_000, 9)]); // 6 MB at ~3 MB/s
    let url = server.put("enc.safetensors", body.clone());
    let yaml = tmp.path().join("slow.yaml");
    fs::write(
        &yaml,
        zerocopy_integration_tests::wrapper_yaml("slow", &[("enc", &url, Some(&sha256_hex(&body)))]),
    )
    .unwrap();
    let agent = Agent::start(tmp.path(), &yaml, &[]).await;
    let mut node = agent.node().await;
    let target = agent.target("v");
    let status = node
        .node_publish_volume(publish("v", &target, "slow", "test"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().starts_with("test/slow: filling ")
            && status
                .message()
                .contains(" MiB/5.7 MiB, 0/1 files done (enc.safetensors)"),
        "{:?}",
        status.message()
    );
    assert_eq!(mounts_at(&target), 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match node.node_publish_volume(publish("v", &target, "slow", "test")).await {
            Ok(_) => break,
            Err(s) if s.code() == Code::Unavailable && Instant::now() < deadline => continue,
            Err(s) => panic!("{s:?}"),
        }
    }
    assert_eq!(fs::read(target.join("enc.safetensors")).unwrap(), body);
}

/// Waits (generously) until `path` exists.
async fn wait_for_path(path: &Path, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !path.exists() {
        assert!(Instant::now() < deadline, "{what}: {} never appeared", path.display());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_catalog_volume_shows_the_namespace_and_what_becomes_ready_later() {
    let tmp = TmpfsDir::new();
    let yaml = wrappers(tmp.path(), 1, 1 << 10);
    // A wrapper of another namespace on the same node.
    let other = file(&[T::f32("w", 256, 9)]);
    let other_src = tmp.path().join("other.safetensors");
    fs::write(&other_src, &other).unwrap();
    let base = fs::read_to_string(&yaml).unwrap();
    let other_doc = format!(
        "---\napiVersion: zerocopy.dev/v1alpha1\nkind: ModelWrapper\nmetadata: {{name: secret-model, namespace: other}}\nspec:\n  pipeline:\n    components:\n      - name: enc\n        weights: {{uri: 'file://{}', sha256: '{}'}}\n",
        other_src.display(),
        sha256_hex(&other)
    );
    fs::write(&yaml, format!("{base}{other_doc}")).unwrap();
    let agent = Agent::start(tmp.path(), &yaml, &[]).await;
    agent.wait_generations("test", "m0", 1).await;
    agent.wait_generations("other", "secret-model", 1).await;

    let mut node = agent.node().await;
    let target = agent.target("cat-1");
    node.node_publish_volume(support::publish_catalog("cat-1", &target, "test"))
        .await
        .unwrap();
    let current = target.join("m0/current");
    assert!(
        current.join("manifest.json").exists(),
        "m0 is Ready: it is in the catalog"
    );
    let generation = fs::read_link(&current).unwrap();
    assert!(target.join("m0").join(&generation).join("enc.safetensors").exists());
    let info: serde_json::Value = serde_json::from_slice(&fs::read(target.join(".node.json")).unwrap()).unwrap();
    assert_eq!(info["node"], "node-a");
    let names: Vec<String> = fs::read_dir(&target)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        !names.iter().any(|n| n.contains("secret")),
        "another namespace leaked: {names:?}"
    );
    assert!(!names.iter().any(|n| n.starts_with(".staging")), "{names:?}");
    let err = fs::write(target.join("m0/x"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(nix::errno::Errno::EROFS as i32));

    // A wrapper created after the pod mounted appears in it, whole.
    let late = file(&[T::f32("w", 512, 7)]);
    let late_src = tmp.path().join("late.safetensors");
    fs::write(&late_src, &late).unwrap();
    let with_late = format!(
        "{}---\napiVersion: zerocopy.dev/v1alpha1\nkind: ModelWrapper\nmetadata: {{name: late, namespace: test}}\nspec:\n  pipeline:\n    components:\n      - name: enc\n        weights: {{uri: 'file://{}', sha256: '{}'}}\n",
        fs::read_to_string(&yaml).unwrap(),
        late_src.display(),
        sha256_hex(&late)
    );
    fs::write(&yaml, with_late).unwrap();
    let late_manifest = target.join("late/current/manifest.json");
    wait_for_path(&late_manifest, "a wrapper made after the catalog was mounted").await;
    assert_eq!(
        fs::read(target.join("late/current/enc.safetensors")).unwrap(),
        late,
        "the file is complete once the manifest is visible"
    );

    // The other namespace's catalog shows only its own wrapper.
    let other_target = agent.target("cat-2");
    node.node_publish_volume(support::publish_catalog("cat-2", &other_target, "other"))
        .await
        .unwrap();
    assert!(other_target.join("secret-model/current/manifest.json").exists());
    assert!(!other_target.join("m0").exists() && !other_target.join("late").exists());

    for (id, t) in [("cat-1", &target), ("cat-2", &other_target)] {
        node.node_unpublish_volume(unpublish(id, t)).await.unwrap();
        assert_eq!(mounts_at(t), 0);
    }
}

/// A catalog pod's process maps weights at its own path, in its own mount
/// namespace, after its publish: a superseded generation it maps stays on the
/// node while it does, and goes once the process is gone, with nothing else
/// happening (no unpublish, no spec change).
#[tokio::test(flavor = "multi_thread")]
async fn a_generation_a_catalog_pod_maps_is_kept_until_the_pod_is_gone() {
    let tmp = TmpfsDir::new();
    let yaml = tmp.path().join("mw.yaml");
    let model = |seed: u32| {
        let body = file(&[T::f32("w", 1 << 16, seed)]);
        let src = tmp.path().join(format!("v{seed}.safetensors"));
        fs::write(&src, &body).unwrap();
        wrapper_yaml(
            "m0",
            &[("enc", &format!("file://{}", src.display()), Some(&sha256_hex(&body)))],
        )
    };
    fs::write(&yaml, model(1)).unwrap();
    let agent = Agent::start(tmp.path(), &yaml, &[]).await;
    agent.wait_generations("test", "m0", 1).await;
    let current = agent.root.join("test/m0/current");
    let old_name = fs::read_link(&current).unwrap().to_str().unwrap().to_string();
    let old = agent.root.join("test/m0").join(&old_name);
    let mut node = agent.node().await;
    let target = agent.target("cat-1");
    node.node_publish_volume(support::publish_catalog("cat-1", &target, "test"))
        .await
        .unwrap();

    // The pod: its own mount namespace with the catalog at /…/pod-mnt; the
    // file is closed once mapped, so only the mapping holds it.
    let script = "import mmap,sys\nf=open(sys.argv[1],'rb')\nm=mmap.mmap(f.fileno(),0,prot=mmap.PROT_READ)\nf.close()\nprint('ready',flush=True)\nsys.stdin.readline()\n";
    let mut pod = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(r#"mkdir -p "$1" && mount --bind "$0" "$1" && exec python3 -c "$2" "$1/m0/$3/enc.safetensors""#)
        .arg(&target)
        .arg(tmp.path().join("pod-mnt"))
        .arg(script)
        .arg(&old_name)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(pod.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");

    // An update supersedes the generation the pod maps.
    fs::write(&yaml, model(2)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while fs::read_link(&current).is_ok_and(|g| g == Path::new(&old_name)) {
        assert!(Instant::now() < deadline, "generation 2 never became current");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Looked at when generation 2 was published, and again since: two
    // collection passes counted that kept it.
    let deadline = Instant::now() + IN_USE_RECHECK * 4 + Duration::from_secs(60);
    loop {
        let metrics = agent.metrics_text().await;
        let kept: u64 = metrics
            .lines()
            .find(|l| l.starts_with("zerocopy_gc_kept_total{namespace=\"test\",wrapper=\"m0\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0);
        if kept >= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no second collection pass looked at the old generation: {metrics}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        old.join("manifest.json").exists(),
        "the generation a pod still maps was freed"
    );

    pod.kill().unwrap();
    pod.wait().unwrap();
    let deadline = Instant::now() + IN_USE_RECHECK + Duration::from_secs(20);
    while old.exists() {
        assert!(
            Instant::now() < deadline,
            "the generation stayed after the last process mapping it exited"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    node.node_unpublish_volume(unpublish("cat-1", &target)).await.unwrap();
}
