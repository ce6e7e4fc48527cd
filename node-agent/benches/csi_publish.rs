//! NodePublishVolume / NodeUnpublishVolume latency on a Ready model, over the
//! real socket against the real agent binary: 1,000 publish/unpublish pairs.
//!
//!     cargo bench -p zerocopy-node-agent --bench csi_publish
//!
//! Prints a table and writes docs/benchmarks-csi.json.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark: panics are the report

#[path = "../tests/support/mod.rs"]
mod support;

use std::fs;
use std::time::Instant;

use support::{publish, unpublish, Agent};
use zerocopy_integration_tests::safetensors::{file, T};
use zerocopy_integration_tests::{sha256_hex, wrapper_yaml, TmpfsDir};

const PAIRS: usize = 1000;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let tmp = TmpfsDir::new();
    let body = file(&[T::f32("w", 1 << 20, 1)]);
    let src = tmp.path().join("m.safetensors");
    fs::write(&src, &body).unwrap();
    let yaml = tmp.path().join("mw.yaml");
    fs::write(
        &yaml,
        wrapper_yaml(
            "bench",
            &[("enc", &format!("file://{}", src.display()), Some(&sha256_hex(&body)))],
        ),
    )
    .unwrap();
    let agent = Agent::start(tmp.path(), &yaml, &[]).await;
    agent.wait_generations("test", "bench", 1).await;
    let mut node = agent.node().await;
    let (mut pubs, mut unpubs) = (Vec::with_capacity(PAIRS), Vec::with_capacity(PAIRS));
    for i in 0..PAIRS {
        let id = format!("vol-{i}");
        let target = agent.target(&id);
        let t0 = Instant::now();
        node.node_publish_volume(publish(&id, &target, "bench", "test"))
            .await
            .unwrap();
        let t1 = Instant::now();
        node.node_unpublish_volume(unpublish(&id, &target)).await.unwrap();
        let t2 = Instant::now();
        pubs.push((t1 - t0).as_secs_f64() * 1e3);
        unpubs.push((t2 - t1).as_secs_f64() * 1e3);
    }
    pubs.sort_by(f64::total_cmp);
    unpubs.sort_by(f64::total_cmp);
    println!("| operation ({PAIRS} pairs, client-side, ms) | p50 | p90 | p99 | max |\n|---|---|---|---|---|");
    let mut json = serde_json::Map::new();
    for (name, v) in [("NodePublishVolume", &pubs), ("NodeUnpublishVolume", &unpubs)] {
        let (p50, p90, p99, max) = (
            percentile(v, 0.5),
            percentile(v, 0.9),
            percentile(v, 0.99),
            v[v.len() - 1],
        );
        println!("| {name} | {p50:.2} | {p90:.2} | {p99:.2} | {max:.2} |");
        json.insert(
            name.into(),
            serde_json::json!({"p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "max_ms": max, "samples_ms": v}),
        );
    }
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/benchmarks-csi.json");
    fs::write(&out, serde_json::to_string(&json).unwrap()).unwrap();
    println!("wrote {}", out.display());
}
