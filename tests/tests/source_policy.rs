//! What a tenant's URI may reach through the agent: node files only below an
//! allowed directory, never through a symlink; no internal or metadata
//! address unless allowed, checked on every redirect hop; pinned sources in a
//! cluster; capped skeletons. Real files, a real HTTP server on 127.0.0.1,
//! real tmpfs.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: panics are the failure report

use std::fs;
use std::path::Path;
use std::sync::atomic::Ordering;

use zerocopy_api::ModelWrapperSpec;
use zerocopy_integration_tests::http::{Fault, Server};
use zerocopy_integration_tests::safetensors::{file, T};
use zerocopy_integration_tests::{sha256_hex, TmpfsDir};
use zerocopy_node_agent::fill::{MountMode, Quiet};
use zerocopy_node_agent::source::policy::SourcePolicy;
use zerocopy_node_agent::{FillEngine, FillError, VolumeRoot};

fn spec(yaml: &str) -> ModelWrapperSpec {
    serde_yaml::from_str(yaml).expect("spec yaml")
}

fn weights(uri: &str, sha: &str) -> ModelWrapperSpec {
    spec(&format!(
        "pipeline: {{components: [{{name: enc, weights: {{uri: '{uri}', sha256: '{sha}'}}}}]}}"
    ))
}

fn model() -> Vec<u8> {
    file(&[T::f32("w", 1000, 1)])
}

async fn fill(root: &Path, policy: SourcePolicy, s: &ModelWrapperSpec) -> Result<(), FillError> {
    FillEngine::new(VolumeRoot::new(root), None, MountMode::Tmpfs, policy)
        .expect("engine")
        .fill("tenant", "m", s, &Quiet)
        .await
        .map(|_| ())
}

fn assert_refused(result: Result<(), FillError>, says: &[&str], root: &Path) {
    let err = result.expect_err("refused");
    assert_eq!(err.category(), "refused", "{err}");
    let msg = err.to_string();
    for want in says {
        assert!(msg.contains(want), "{msg:?} lacks {want:?}");
    }
    let gens = VolumeRoot::new(root).generations().expect("list");
    assert!(gens.is_empty(), "something was published: {gens:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_file_sources_stay_below_allowed_directories_and_never_follow_symlinks() {
    let tmp = TmpfsDir::new();
    let models = tmp.path().join("models");
    let elsewhere = tmp.path().join("node-secrets");
    fs::create_dir_all(models.join("sub")).unwrap();
    fs::create_dir_all(&elsewhere).unwrap();
    let body = model();
    let sha = sha256_hex(&body);
    fs::write(models.join("sub/enc.safetensors"), &body).unwrap();
    // The tenant's "model" is a node credential: the same bytes, so only the
    // path decides.
    fs::write(elsewhere.join("kubelet-client.pem"), &body).unwrap();
    std::os::unix::fs::symlink(elsewhere.join("kubelet-client.pem"), models.join("link.safetensors")).unwrap();
    std::os::unix::fs::symlink(&elsewhere, models.join("dir-link")).unwrap();
    let policy = || SourcePolicy::cluster(vec![models.clone()], vec![]);

    let root = tmp.path().join("root");
    let outside = format!("file://{}", elsewhere.join("kubelet-client.pem").display());
    assert_refused(
        fill(&root, policy(), &weights(&outside, &sha)).await,
        &[
            "--allow-file-dir",
            "sources.allowFileDirs",
            &models.display().to_string(),
        ],
        &root,
    );
    let dotdot = format!("file://{}/../node-secrets/kubelet-client.pem", models.display());
    assert_refused(
        fill(&root, policy(), &weights(&dotdot, &sha)).await,
        &["--allow-file-dir"],
        &root,
    );
    for link in ["link.safetensors", "dir-link/kubelet-client.pem"] {
        let uri = format!("file://{}/{link}", models.display());
        assert_refused(fill(&root, policy(), &weights(&uri, &sha)).await, &["symlink"], &root);
    }
    // /proc and other namespaces' generations are just more paths outside.
    let mountinfo = spec(&format!(
        "pipeline: {{components: [{{name: enc, weights: {{uri: 'file://{}/sub/enc.safetensors', sha256: '{sha}'}}, skeleton: {{uri: 'file:///proc/self/mountinfo', sha256: '{}'}}}}]}}",
        models.display(),
        "0".repeat(64)
    ));
    assert_refused(
        fill(&root, policy(), &mountinfo).await,
        &["/proc/self/mountinfo"],
        &root,
    );
    let no_dirs = format!("file://{}/sub/enc.safetensors", models.display());
    assert_refused(
        fill(&root, SourcePolicy::cluster(vec![], vec![]), &weights(&no_dirs, &sha)).await,
        &["none is allowed"],
        &root,
    );

    // Below the allowed directory, a plain file fills.
    fill(&root, policy(), &weights(&no_dirs, &sha))
        .await
        .expect("allowed file");
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_http_sources_refuse_internal_addresses_before_any_request() {
    let tmp = TmpfsDir::new();
    let server = Server::start(Fault::None);
    let body = model();
    let sha = sha256_hex(&body);
    let url = server.put("enc.safetensors", body.clone());
    let root = tmp.path().join("root");
    let cluster = || SourcePolicy::cluster(vec![], vec![]);

    assert_refused(
        fill(&root, cluster(), &weights(&url, &sha)).await,
        &["127.0.0.1 is loopback", "--allow-network", "sources.allowNetworks"],
        &root,
    );
    // A name is resolved once and checked: localhost is loopback too.
    let by_name = url.replace("127.0.0.1", "localhost");
    assert_refused(
        fill(&root, cluster(), &weights(&by_name, &sha)).await,
        &["resolves to a refused address", "loopback"],
        &root,
    );
    assert_eq!(
        server.requests.load(Ordering::SeqCst),
        0,
        "no request reached the internal server"
    );

    // Allowed by the admin (an in-cluster object store), it fills.
    let allowed = || SourcePolicy::cluster(vec![], vec!["127.0.0.0/8".parse().unwrap()]);
    fill(&root, allowed(), &weights(&url, &sha))
        .await
        .expect("allowed network");

    // Every redirect hop is checked: an allowed server cannot bounce the
    // agent to cloud metadata, which no value allows.
    let bounce = server.redirect(
        "bounce",
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    );
    let everything = SourcePolicy::cluster(vec![], vec!["0.0.0.0/0".parse().unwrap()]);
    let root2 = tmp.path().join("root2");
    assert_refused(
        fill(&root2, everything, &weights(&bounce, &sha)).await,
        &["redirect", "169.254.169.254", "link-local"],
        &root2,
    );
    let hop = server.redirect("hop", &url);
    fill(&root2, allowed(), &weights(&hop, &sha))
        .await
        .expect("a checked hop is followed");
}

#[tokio::test(flavor = "multi_thread")]
async fn standalone_still_blocks_metadata_but_reads_local_files_and_loopback() {
    let tmp = TmpfsDir::new();
    let server = Server::start(Fault::None);
    let body = model();
    let sha = sha256_hex(&body);
    let url = server.put("enc.safetensors", body.clone());
    let root = tmp.path().join("root");
    fill(&root, SourcePolicy::standalone(), &weights(&url, &sha))
        .await
        .expect("loopback");
    let bounce = server.redirect("bounce", "http://[fd00:ec2::254]/latest/");
    let root2 = tmp.path().join("root2");
    assert_refused(
        fill(&root2, SourcePolicy::standalone(), &weights(&bounce, &sha)).await,
        &["fd00:ec2::254"],
        &root2,
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cluster_refuses_unpinned_sources() {
    let tmp = TmpfsDir::new();
    let models = tmp.path().join("models");
    fs::create_dir_all(&models).unwrap();
    fs::write(models.join("enc.safetensors"), model()).unwrap();
    let s = spec(&format!(
        "pipeline: {{components: [{{name: enc, weights: {{uri: 'file://{}/enc.safetensors'}}}}]}}",
        models.display()
    ));
    let root = tmp.path().join("root");
    let err = fill(&root, SourcePolicy::cluster(vec![models.clone()], vec![]), &s)
        .await
        .expect_err("unpinned");
    assert_eq!(err.category(), "invalid", "{err}");
    assert!(err.to_string().contains("sha256 is required in a cluster"), "{err}");
    fill(&root, SourcePolicy::standalone(), &s)
        .await
        .expect("standalone allows it");
}

#[tokio::test(flavor = "multi_thread")]
async fn skeletons_are_capped_and_head_is_optional() {
    let tmp = TmpfsDir::new();
    let body = model();
    let sha = sha256_hex(&body);
    let dir = tmp.path().join("src");
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("enc.safetensors"), &body).unwrap();
    let big = vec![7u8; (64 << 20) + 1];
    fs::write(dir.join("enc.skeleton.pt"), &big).unwrap();
    let s = spec(&format!(
        "pipeline: {{components: [{{name: enc, weights: {{uri: 'file://{0}/enc.safetensors'}}, skeleton: {{uri: 'file://{0}/enc.skeleton.pt'}}}}]}}",
        dir.display()
    ));
    let root = tmp.path().join("root");
    let err = fill(&root, SourcePolicy::standalone(), &s).await.expect_err("too big");
    assert!(err.to_string().contains("at most 64 MiB"), "{err}");
    assert!(VolumeRoot::new(&root).generations().unwrap().is_empty());

    // Presigned GET URLs answer 403 to HEAD: the GET decides.
    let server = Server::start(Fault::NoHead);
    let url = server.put("enc.safetensors", body);
    fill(&root, SourcePolicy::standalone(), &weights(&url, &sha))
        .await
        .expect("a source that refuses HEAD");
}
