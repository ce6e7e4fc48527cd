//! A model update reaches new pods without disturbing running ones, and the
//! old generation's memory is returned when its last pod goes. Its own test
//! binary so nothing else moves `Shmem` while it measures.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: panics are the failure report

mod support;

use std::fs;
use std::time::{Duration, Instant};

use support::{publish, shmem, unpublish, Agent};
use zerocopy_api::Manifest;
use zerocopy_integration_tests::safetensors::{file, T};
use zerocopy_integration_tests::{sha256_hex, wrapper_yaml, TmpfsDir};

fn write_model(dir: &std::path::Path, name: &str, seed: u32) -> (String, String, Vec<u8>) {
    let body = file(&[T::f32("w", 16 << 20, seed)]); // 64 MiB
    let path = dir.join(name);
    fs::write(&path, &body).unwrap();
    (format!("file://{}", path.display()), sha256_hex(&body), body)
}

fn generation_at(target: &std::path::Path) -> String {
    let m: Manifest = serde_json::from_slice(&fs::read(target.join("manifest.json")).unwrap()).unwrap();
    m.generation
}

#[tokio::test(flavor = "multi_thread")]
async fn an_update_reaches_new_pods_and_frees_the_old_generation_after_the_last_pod() {
    let tmp = TmpfsDir::new();
    let yaml = tmp.path().join("mw.yaml");
    let (uri1, sha1, body1) = write_model(tmp.path(), "v1.safetensors", 1);
    fs::write(&yaml, wrapper_yaml("bert", &[("enc", &uri1, Some(&sha1))])).unwrap();
    let agent = Agent::start(tmp.path(), &yaml, &[]).await;
    agent.wait_generations("test", "bert", 1).await;
    let mut node = agent.node().await;

    let a = agent.target("pod-a");
    node.node_publish_volume(publish("pod-a", &a, "bert", "test"))
        .await
        .unwrap();
    let gen1 = generation_at(&a);

    // the spec changes: generation 2 fills beside generation 1
    let (uri2, sha2, body2) = write_model(tmp.path(), "v2.safetensors", 2);
    fs::write(&yaml, wrapper_yaml("bert", &[("enc", &uri2, Some(&sha2))])).unwrap();
    agent.wait_generations("test", "bert", 2).await;

    let b = agent.target("pod-b");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // until the agent has re-read the file, a publish still resolves to generation 1
        node.node_publish_volume(publish("pod-b", &b, "bert", "test"))
            .await
            .unwrap();
        if generation_at(&b) != gen1 {
            break;
        }
        node.node_unpublish_volume(unpublish("pod-b", &b)).await.unwrap();
        assert!(Instant::now() < deadline, "new publishes never got generation 2");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(fs::read(b.join("enc.safetensors")).unwrap(), body2);
    // pod A keeps reading generation 1, and it is still on the node
    assert_eq!(generation_at(&a), gen1);
    assert_eq!(fs::read(a.join("enc.safetensors")).unwrap(), body1);
    let gen1_dir = agent.root.join("test/bert").join(&gen1);
    assert!(gen1_dir.join("manifest.json").exists());

    let before = shmem();
    node.node_unpublish_volume(unpublish("pod-a", &a)).await.unwrap();
    assert!(!gen1_dir.exists(), "generation 1 should be removed once pod A is gone");
    let freed = before.saturating_sub(shmem());
    let size = body1.len() as u64;
    assert!(
        freed as f64 >= 0.9 * size as f64,
        "Shmem dropped by {freed} bytes; generation 1 holds {size}"
    );
    node.node_unpublish_volume(unpublish("pod-b", &b)).await.unwrap();
    assert!(
        agent.root.join("test/bert").join(generation_at_path(&agent)).exists(),
        "the wanted generation stays"
    );
}

fn generation_at_path(agent: &Agent) -> String {
    fs::read_dir(agent.root.join("test/bert"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .file_name()
        .into_string()
        .unwrap()
}
