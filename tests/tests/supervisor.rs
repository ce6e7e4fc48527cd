//! The fill loop of `run` and `standalone --serve` against real HTTP servers
//! on 127.0.0.1 and real tmpfs: failed fills heal, a slow source does not
//! hold up others, a stalled one is cut off, an update larger than half the
//! capacity goes through, and what is complete is Ready at once.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: panics are the failure report

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use zerocopy_api::format::generation_digest;
use zerocopy_api::ModelWrapper;
use zerocopy_integration_tests::http::{Fault, Server};
use zerocopy_integration_tests::safetensors::{file, T};
use zerocopy_integration_tests::{sha256_hex, TmpfsDir};
use zerocopy_node_agent::csi::catalog::{Catalog, FillState};
use zerocopy_node_agent::csi::ledger::{Ledger, Publication};
use zerocopy_node_agent::csi::metrics::Metrics;
use zerocopy_node_agent::fill::MountMode;
use zerocopy_node_agent::manifests::LoadedWrapper;
use zerocopy_node_agent::source::policy::SourcePolicy;
use zerocopy_node_agent::supervisor::{FillPolicy, Supervisor};
use zerocopy_node_agent::{FillEngine, VolumeRoot};

struct Node {
    _tmp: TmpfsDir,
    root: VolumeRoot,
    catalog: Arc<Catalog>,
    ledger: Arc<Ledger>,
    sup: Supervisor,
}

fn node(capacity: Option<u64>, policy: FillPolicy) -> Node {
    let tmp = TmpfsDir::new();
    let root = VolumeRoot::new(tmp.path().join("root"));
    let engine = Arc::new(
        FillEngine::new(root.clone(), capacity, MountMode::Tmpfs, SourcePolicy::standalone()).expect("engine"),
    );
    let catalog = Arc::new(Catalog::default());
    let (ledger, _) = Ledger::load(&tmp.path().join("state")).unwrap();
    let ledger = Arc::new(ledger);
    let sup = Supervisor::new(engine, catalog.clone(), ledger.clone(), Metrics::new().unwrap(), policy);
    Node {
        _tmp: tmp,
        root,
        catalog,
        ledger,
        sup,
    }
}

fn fast_policy() -> FillPolicy {
    FillPolicy {
        retry_base: Duration::from_millis(200),
        retry_max: Duration::from_secs(1),
        ..FillPolicy::default()
    }
}

fn wanted(name: &str, url: &str, body: &[u8]) -> LoadedWrapper {
    let yaml = format!(
        "apiVersion: zerocopy.dev/v1alpha1\nkind: ModelWrapper\nmetadata: {{name: {name}, namespace: ml}}\nspec:\n  pipeline:\n    components:\n      - name: enc\n        weights: {{uri: '{url}', sha256: '{}'}}\n",
        sha256_hex(body)
    );
    let wrapper: ModelWrapper = serde_yaml::from_str(&yaml).unwrap();
    LoadedWrapper {
        file: Path::new("test.yaml").to_path_buf(),
        namespace: "ml".into(),
        name: name.into(),
        wrapper,
    }
}

fn state(n: &Node, w: &LoadedWrapper) -> FillState {
    n.catalog
        .state(&w.namespace, &w.name, &generation_digest(&w.wrapper.spec))
}

/// Runs the loop until `done` holds, failing after `secs`.
async fn drive(n: &mut Node, what: &str, secs: u64, done: impl Fn(&Node) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        n.sup.step();
        if done(n) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {secs}s waiting for {what}"
        );
        let _ = tokio::time::timeout(Duration::from_millis(200), n.sup.wait()).await;
    }
}

fn model(seed: u32, floats: usize) -> Vec<u8> {
    file(&[T::f32("w", floats, seed)])
}

#[tokio::test(flavor = "multi_thread")]
async fn a_source_that_answers_503_heals_by_retrying() {
    let server = Server::start(Fault::Unavailable(3));
    let body = model(1, 10_000);
    let w = wanted("m", &server.put("m.safetensors", body.clone()), &body);
    let mut n = node(None, fast_policy());
    n.sup.set_wanted(std::slice::from_ref(&w));
    drive(&mut n, "a first failure", 60, |n| {
        matches!(state(n, &w), FillState::Failed(_))
    })
    .await;
    let FillState::Failed(f) = state(&n, &w) else {
        unreachable!()
    };
    assert_eq!(f.reason, "SourceUnavailable", "{f:?}");
    assert!(f.retry_at.is_some(), "a 503 is retried: {f:?}");
    assert!(f.describe().contains("next attempt in"), "{}", f.describe());
    drive(&mut n, "Ready after retries", 60, |n| state(n, &w) == FillState::Ready).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_source_does_not_hold_up_another_wrapper() {
    let slow_server = Server::start(Fault::Drip);
    let fast_server = Server::start(Fault::None);
    let slow_body = model(2, 200_000); // 800 KB at 10 KB/s: over a minute
    let fast_body = model(3, 10_000);
    let slow = wanted("slow", &slow_server.put("s.safetensors", slow_body.clone()), &slow_body);
    let fast = wanted("fast", &fast_server.put("f.safetensors", fast_body.clone()), &fast_body);
    let mut n = node(None, fast_policy());
    n.sup.set_wanted(&[slow.clone(), fast.clone()]);
    drive(&mut n, "the fast wrapper Ready", 60, |n| {
        state(n, &fast) == FillState::Ready
    })
    .await;
    assert!(
        matches!(state(&n, &slow), FillState::Filling(_)),
        "the slow one is still filling: {:?}",
        state(&n, &slow)
    );
    // Nobody wants the slow one any more: its fill stops and leaves nothing.
    n.sup.set_wanted(std::slice::from_ref(&fast));
    drive(&mut n, "the slow fill stopped and its staging gone", 30, |n| {
        std::fs::read_dir(n.root.staging_dir()).unwrap().count() == 0
    })
    .await;
    assert!(n
        .root
        .read_manifest("ml", "slow", &generation_digest(&slow.wrapper.spec))
        .is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_source_is_cut_off_and_retried() {
    let server = Server::start(Fault::Drip);
    let body = model(4, 200_000);
    let w = wanted("m", &server.put("m.safetensors", body.clone()), &body);
    let policy = FillPolicy {
        min_bytes_per_second: 1 << 20,
        throughput_window: Duration::from_secs(2),
        retry_base: Duration::from_secs(30),
        ..FillPolicy::default()
    };
    let mut n = node(None, policy);
    n.sup.set_wanted(std::slice::from_ref(&w));
    drive(&mut n, "the stall detected", 60, |n| {
        matches!(state(n, &w), FillState::Failed(_))
    })
    .await;
    let FillState::Failed(f) = state(&n, &w) else {
        unreachable!()
    };
    assert_eq!(f.reason, "SourceTooSlow", "{f:?}");
    assert!(f.message.contains("below the minimum"), "{}", f.message);
    assert!(f.retry_at.is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_update_larger_than_half_the_capacity_replaces_the_old_generation() {
    // 5 MiB on an 8 MiB node, updated in place: the old generation must go
    // before the new one can fit.
    let server = Server::start(Fault::None);
    let floats = 5 * (1 << 20) / 4 - 64;
    let v1 = model(5, floats);
    let v2 = model(6, floats);
    let w1 = wanted("m", &server.put("v1.safetensors", v1.clone()), &v1);
    let w2 = wanted("m", &server.put("v2.safetensors", v2.clone()), &v2);
    let mut n = node(Some(8 << 20), fast_policy());
    n.sup.set_wanted(std::slice::from_ref(&w1));
    drive(&mut n, "v1 Ready", 60, |n| state(n, &w1) == FillState::Ready).await;
    n.sup.set_wanted(std::slice::from_ref(&w2));
    drive(&mut n, "v2 Ready in place of v1", 60, |n| {
        state(n, &w2) == FillState::Ready
    })
    .await;
    let gens: Vec<String> = n
        .root
        .generations()
        .unwrap()
        .into_iter()
        .map(|g| g.generation)
        .collect();
    assert_eq!(gens, vec![generation_digest(&w2.wrapper.spec)], "v1 freed");

    // When a pod still mounts the old generation, the new one cannot fit:
    // the status says so, with the numbers and the way out, and keeps trying.
    let v3 = model(7, floats);
    let w3 = wanted("m", &server.put("v3.safetensors", v3.clone()), &v3);
    let g2 = generation_digest(&w2.wrapper.spec);
    n.ledger
        .insert(Publication {
            volume_id: "pod-1-vol".into(),
            target: "/var/lib/kubelet/pods/1/volumes/m".into(),
            namespace: "ml".into(),
            name: "m".into(),
            generation: g2.clone(),
            pod: "pod-1".into(),
            pod_uid: "1".into(),
            published_at: "2026-01-01T00:00:00Z".into(),
            catalog: false,
        })
        .unwrap();
    n.sup.set_wanted(std::slice::from_ref(&w3));
    drive(&mut n, "InsufficientCapacity", 60, |n| {
        matches!(state(n, &w3), FillState::Failed(_))
    })
    .await;
    let FillState::Failed(f) = state(&n, &w3) else {
        unreachable!()
    };
    assert_eq!(f.reason, "InsufficientCapacity", "{f:?}");
    for want in [
        format!("ml/m@{g2}"),
        "5.0 MiB".to_string(),
        "8.0 MiB".to_string(),
        "end the pods".to_string(),
    ] {
        assert!(f.message.contains(&want), "{:?} lacks {want:?}", f.message);
    }
    assert!(f.retry_at.is_some(), "capacity frees up when the pod ends: retried");
    assert!(
        n.root.read_manifest("ml", "m", &g2).is_some(),
        "the mounted generation is kept"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn complete_generations_are_ready_before_any_fill_runs() {
    let server = Server::start(Fault::None);
    let body = model(8, 10_000);
    let done = wanted("done", &server.put("d.safetensors", body.clone()), &body);
    let drip = Server::start(Fault::Drip);
    let slow_body = model(9, 200_000);
    let slow = wanted("slow", &drip.put("s.safetensors", slow_body.clone()), &slow_body);
    let mut n = node(None, fast_policy());
    n.sup.set_wanted(std::slice::from_ref(&done));
    drive(&mut n, "Ready", 60, |n| state(n, &done) == FillState::Ready).await;

    // A restarted agent: a fresh catalog and loop over the same root, with a
    // slow fill queued first.
    let tmp = n._tmp;
    let root = n.root.clone();
    drop(n.sup);
    let engine = Arc::new(FillEngine::new(root, None, MountMode::Tmpfs, SourcePolicy::standalone()).expect("engine"));
    let catalog = Arc::new(Catalog::default());
    let (ledger, _) = Ledger::load(&tmp.path().join("state")).unwrap();
    let mut sup = Supervisor::new(
        engine,
        catalog.clone(),
        Arc::new(ledger),
        Metrics::new().unwrap(),
        fast_policy(),
    );
    sup.set_wanted(&[slow.clone(), done.clone()]);
    assert_eq!(
        catalog.state("ml", "done", &generation_digest(&done.wrapper.spec)),
        FillState::Ready,
        "Ready at once, not after the queued fills"
    );
    assert_eq!(
        catalog.state("ml", "slow", &generation_digest(&slow.wrapper.spec)),
        FillState::Pending
    );
}
