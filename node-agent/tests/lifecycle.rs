//! The agent process as an operator on call meets it: its socket is root-only,
//! a second agent cannot take its socket or its root, probes answer, and
//! SIGTERM stops it cleanly without dropping a pod's mount.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: panics are the failure report

mod support;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{mounts_at, publish, Agent, BIN};

mod tonic_client {
    pub type Node = zerocopy_node_agent::csi::proto::node_client::NodeClient<tonic::transport::Channel>;
}
use zerocopy_integration_tests::safetensors::{file, T};
use zerocopy_integration_tests::{sha256_hex, TmpfsDir};

fn one_wrapper(dir: &Path) -> std::path::PathBuf {
    let body = file(&[T::f32("w", 1024, 1)]);
    let src = dir.join("m.safetensors");
    fs::write(&src, &body).unwrap();
    let yaml = dir.join("wrappers.yaml");
    fs::write(
        &yaml,
        format!(
            "apiVersion: zerocopy.dev/v1alpha1\nkind: ModelWrapper\nmetadata: {{name: m, namespace: test}}\nspec:\n  pipeline:\n    components:\n      - name: enc\n        weights: {{uri: 'file://{}', sha256: '{}'}}\n",
            src.display(),
            sha256_hex(&body)
        ),
    )
    .unwrap();
    yaml
}

/// A second agent with `args`; returns its exit status and stderr.
fn second_agent(args: &[&str], yaml: &Path) -> (std::process::ExitStatus, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .args(["standalone", "-q", "--serve", "-f"])
        .arg(yaml)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the second agent kept running although the first holds the resource");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    (status, err)
}

fn http_get(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn one_agent_owns_its_socket_and_root_answers_probes_and_stops_cleanly_on_sigterm() {
    let tmp = TmpfsDir::new();
    let yaml = one_wrapper(tmp.path());
    let mut agent = Agent::start(&tmp.path().join("a"), &yaml, &[]).await;

    // The socket is a socket, readable and writable by root only.
    let meta = fs::metadata(&agent.socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    // Another agent on the same socket (own root) is refused, socket untouched.
    let other = tmp.path().join("b");
    let (status, err) = second_agent(
        &[
            "--root",
            other.join("root").to_str().unwrap(),
            "--state-dir",
            other.join("state").to_str().unwrap(),
            "--csi-socket",
            agent.socket.to_str().unwrap(),
        ],
        &yaml,
    );
    assert!(!status.success());
    assert!(err.contains("is served by another process"), "{err}");
    assert!(fs::metadata(&agent.socket).unwrap().file_type().is_socket());

    // Another agent on the same root (own socket) is refused and says who has it.
    let pid = agent.child.as_ref().unwrap().id();
    let (status, err) = second_agent(
        &[
            "--root",
            agent.root.to_str().unwrap(),
            "--state-dir",
            other.join("state2").to_str().unwrap(),
            "--csi-socket",
            other.join("csi2.sock").to_str().unwrap(),
        ],
        &yaml,
    );
    assert!(!status.success());
    assert!(err.contains(&format!("is in use by pid {pid}")), "{err}");

    // Probes.
    for path in ["/healthz", "/readyz"] {
        let answer = http_get(&agent.metrics, path);
        assert!(answer.starts_with("HTTP/1.1 200"), "{path}: {answer}");
    }

    // A pod's mount survives SIGTERM; the socket goes with the process.
    let mut node = agent.node().await;
    node.node_publish_volume(publish("v1", &agent.target("v1"), "m", "test"))
        .await
        .unwrap();
    assert_eq!(mounts_at(&agent.target("v1")), 1);
    let child = agent.child.take().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "SIGTERM is a clean exit: {:?}", output.status);
    assert!(!agent.socket.exists(), "the socket is removed on shutdown");
    assert_eq!(mounts_at(&agent.target("v1")), 1, "the pod's mount stays");
    assert_eq!(agent.ledger_len(), 1, "and so does its record");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_publish_that_overlaps_one_in_flight_for_the_same_volume_is_aborted() {
    let tmp = TmpfsDir::new();
    // A source that trickles, so the first publish waits on the fill while
    // holding the volume; the second arrives while it provably still runs.
    let server = zerocopy_integration_tests::http::Server::start(zerocopy_integration_tests::http::Fault::Drip);
    let body = file(&[T::f32("w", 100_000, 2)]);
    let url = server.put("slow.safetensors", body.clone());
    let yaml = tmp.path().join("slow.yaml");
    fs::write(
        &yaml,
        format!(
            "apiVersion: zerocopy.dev/v1alpha1\nkind: ModelWrapper\nmetadata: {{name: slow, namespace: test}}\nspec:\n  pipeline:\n    components:\n      - name: enc\n        weights: {{uri: '{url}', sha256: '{}'}}\n",
            sha256_hex(&body)
        ),
    )
    .unwrap();
    let agent = Agent::start(&tmp.path().join("a"), &yaml, &["--publish-wait", "60"]).await;
    let target = agent.target("v1");
    // Two kubelet retries of the same volume at once: whichever arrives
    // second must get ABORTED while the first is still waiting on the fill.
    let call = |mut client: tonic_client::Node| {
        let req = publish("v1", &target, "slow", "test");
        tokio::spawn(async move { client.node_publish_volume(req).await.map(|_| ()) })
    };
    let mut a = call(agent.node().await);
    let mut b = call(agent.node().await);
    let (done, other) = tokio::select! {
        r = &mut a => (r.unwrap(), b),
        r = &mut b => (r.unwrap(), a),
    };
    let status = done.expect_err("the overlapping publish must not succeed");
    assert_eq!(status.code(), tonic::Code::Aborted, "{status:?}");
    assert!(
        !other.is_finished(),
        "the overlap was real: the other publish was still running"
    );
    other.abort();
}
