//! Uploads to a node agent and fills from peers: a real agent process
//! serving HTTP on 127.0.0.1, a real fill engine reading from it, a lying
//! peer, and the authorization rules.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: panics are the failure report

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use zerocopy_api::ModelWrapperSpec;
use zerocopy_integration_tests::http::{Fault, Server};
use zerocopy_integration_tests::safetensors::{file, T};
use zerocopy_integration_tests::{agent_bin, sha256_hex, TmpfsDir};
use zerocopy_node_agent::fill::{MountMode, Quiet};
use zerocopy_node_agent::peer::{PeerDirectory, PeerView};
use zerocopy_node_agent::source::policy::SourcePolicy;
use zerocopy_node_agent::{FillEngine, FillError, VolumeRoot};

const UPLOAD_TOKEN: &str = "the-driver-s-secret";
const PEER_TOKEN: &str = "agents-only";

fn upload_spec(sha: &str) -> ModelWrapperSpec {
    serde_yaml::from_str(&format!(
        "pipeline: {{components: [{{name: enc, weights: {{uri: 'upload:', sha256: {sha}}}}}]}}"
    ))
    .unwrap()
}

struct AgentProcess {
    child: Child,
    /// Uploads from pods.
    endpoint: String,
    /// Blob reads by agents (its own listener).
    blobs: String,
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `standalone --serve` with the upload and peer server on a free port.
fn start_agent(dir: &Path, sha: &str) -> AgentProcess {
    let yaml = dir.join("up.yaml");
    fs::write(
        &yaml,
        format!(
            "apiVersion: zerocopy.dev/v1alpha1\nkind: ModelWrapper\nmetadata:\n  name: up\n  namespace: test\n  annotations: {{zerocopy.dev/upload-token-sha256: {}}}\nspec:\n  pipeline:\n    components:\n      - name: enc\n        weights: {{uri: 'upload:', sha256: {sha}}}\n",
            sha256_hex(UPLOAD_TOKEN.as_bytes())
        ),
    )
    .unwrap();
    let token = dir.join("peer-token");
    fs::write(&token, format!("{PEER_TOKEN}\n")).unwrap();
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (port, blob_port) = (free(), free());
    let child = Command::new(agent_bin())
        .arg("--root")
        .arg(dir.join("root"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--csi-socket")
        .arg(dir.join("csi.sock"))
        .args([
            "--node-id",
            "node-a",
            "standalone",
            "-q",
            "--serve",
            "--watch-interval",
            "0.2",
        ])
        .args(["--peer-addr", &format!("127.0.0.1:{port}")])
        .args(["--blob-addr", &format!("127.0.0.1:{blob_port}")])
        .arg("--peer-token-file")
        .arg(&token)
        .arg("-f")
        .arg(&yaml)
        .env("RUST_LOG", "warn,zerocopy_node_agent=info")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    AgentProcess {
        child,
        endpoint: format!("http://127.0.0.1:{port}"),
        blobs: format!("http://127.0.0.1:{blob_port}"),
    }
}

async fn wait_for<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Peers a test names.
struct StaticPeers(Vec<(String, String)>);

impl PeerDirectory for StaticPeers {
    fn view(&self, _: &str, _: &str, _: &str) -> PeerView {
        PeerView {
            ready: self.0.clone(),
            earlier_fillers: Vec::new(),
            catching_up: false,
        }
    }
}

fn complete(root: &Path, name: &str) -> Option<std::path::PathBuf> {
    VolumeRoot::new(root)
        .generations()
        .unwrap()
        .into_iter()
        .find(|g| g.name == name && g.manifest.is_some())
        .map(|g| g.path)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upload_is_authorized_and_verified_then_peers_copy_it_and_skip_a_liar() {
    let tmp = TmpfsDir::new();
    let body = file(&[T::f32("w", 200_000, 3)]);
    let sha = sha256_hex(&body);
    let agent = start_agent(tmp.path(), &sha);
    let http = reqwest::Client::new();
    let upload_url = format!("{}/v1/uploads/test/up/{sha}", agent.endpoint);
    wait_for("the agent's upload endpoint", async || {
        let r = http.get(&upload_url).bearer_auth(UPLOAD_TOKEN).send().await.ok()?;
        (r.status() == 404).then_some(())
    })
    .await;

    // Who may upload, and what.
    let r = http.put(&upload_url).body(body.clone()).send().await.unwrap();
    assert_eq!(r.status(), 401, "{}", r.text().await.unwrap());
    let r = http
        .put(&upload_url)
        .bearer_auth("guess")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let other = format!("{}/v1/uploads/test/up/{}", agent.endpoint, sha256_hex(b"x"));
    let r = http
        .put(&other)
        .bearer_auth(UPLOAD_TOKEN)
        .body(b"x".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409, "only declared digests are taken");
    let r = http
        .put(format!("{}/v1/uploads/test/nope/{sha}", agent.endpoint))
        .bearer_auth(UPLOAD_TOKEN)
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503, "not placed here (yet): the uploader retries");
    let mut corrupt = body.clone();
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0xff;
    let r = http
        .put(&upload_url)
        .bearer_auth(UPLOAD_TOKEN)
        .body(corrupt.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422, "{}", r.text().await.unwrap());
    assert!(
        complete(&tmp.path().join("root"), "up").is_none(),
        "corrupt bytes became visible"
    );

    let r = http
        .put(&upload_url)
        .bearer_auth(UPLOAD_TOKEN)
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let generation = wait_for("the uploaded generation", async || {
        complete(&tmp.path().join("root"), "up")
    })
    .await;
    assert_eq!(fs::read(generation.join("enc.safetensors")).unwrap(), body);
    // The upload itself is freed once a generation holds its bytes.
    wait_for("the upload to be freed", async || {
        let left = fs::read_dir(tmp.path().join("root/.uploads"))
            .map(|d| d.count())
            .unwrap_or(0);
        (left == 0).then_some(())
    })
    .await;

    // Blobs go to agents only: not on the upload port pods reach, and only
    // with the peer token on their own port.
    let on_upload_port = format!("{}/v1/blobs/{sha}", agent.endpoint);
    let r = http.get(&on_upload_port).bearer_auth(PEER_TOKEN).send().await.unwrap();
    assert_eq!(r.status(), 404, "the upload port serves no blobs");
    let blob = format!("{}/v1/blobs/{sha}", agent.blobs);
    assert_eq!(http.get(&blob).send().await.unwrap().status(), 401);
    let served = http.get(&blob).bearer_auth(PEER_TOKEN).send().await.unwrap();
    assert_eq!(served.status(), 200);
    assert_eq!(served.bytes().await.unwrap().as_ref(), body.as_slice());

    // Another node: a lying peer first, then the real one.
    let liar = Server::start(Fault::None);
    liar.put(&format!("v1/blobs/{sha}"), corrupt);
    let peers = StaticPeers(vec![
        ("liar".into(), liar.base.clone()),
        ("node-a".into(), agent.blobs.clone()),
    ]);
    let other_root = tmp.path().join("other-node");
    let engine = FillEngine::new(
        VolumeRoot::new(&other_root),
        None,
        MountMode::Auto,
        SourcePolicy::cluster(vec![], vec![]),
    )
    .unwrap()
    .with_peers(Arc::new(peers), PEER_TOKEN)
    .unwrap();
    engine.fill("test", "up", &upload_spec(&sha), &Quiet).await.unwrap();
    let copy = complete(&other_root, "up").expect("filled from the honest peer");
    assert_eq!(fs::read(copy.join("enc.safetensors")).unwrap(), body);

    // Nobody holds it and nothing was uploaded: the fill waits, it does not fail.
    let lonely_root = tmp.path().join("lonely-node");
    let lonely = FillEngine::new(
        VolumeRoot::new(&lonely_root),
        None,
        MountMode::Auto,
        SourcePolicy::cluster(vec![], vec![]),
    )
    .unwrap()
    .with_peers(Arc::new(StaticPeers(vec![])), PEER_TOKEN)
    .unwrap();
    let err = lonely.fill("test", "up", &upload_spec(&sha), &Quiet).await.unwrap_err();
    assert!(matches!(err, FillError::WaitingForSource { .. }), "{err}");
    assert!(err.to_string().contains("upload"), "{err}");
}
