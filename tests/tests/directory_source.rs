//! Directory components (`source: file:///dir/`) through the fill engine,
//! with the cluster's source policy: every file pinned (directly or through
//! a pinned SHA256SUMS), symlinks refused, bad content refused by name, and
//! the published generation a sealed format v2 directory.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: panics are the failure report

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use zerocopy_api::ModelWrapperSpec;
use zerocopy_integration_tests::safetensors::{file, T};
use zerocopy_integration_tests::{sha256_hex, TmpfsDir};
use zerocopy_node_agent::fill::{MountMode, Quiet};
use zerocopy_node_agent::source::policy::SourcePolicy;
use zerocopy_node_agent::{FillEngine, FillError, FillOutcome, VolumeRoot};

struct Models {
    dir: PathBuf,
    shard1: Vec<u8>,
    shard2: Vec<u8>,
}

/// `<tmp>/models/llm/`: two shards, their index, a config, a pooling config.
fn models(tmp: &Path) -> Models {
    let dir = tmp.join("models/llm");
    fs::create_dir_all(dir.join("1_Pooling")).unwrap();
    let shard1 = file(&[T::f32("a.weight", 1000, 1)]);
    let shard2 = file(&[T::f32("b.weight", 500, 2)]);
    fs::write(dir.join("model-00001-of-00002.safetensors"), &shard1).unwrap();
    fs::write(dir.join("model-00002-of-00002.safetensors"), &shard2).unwrap();
    fs::write(
        dir.join("model.safetensors.index.json"),
        r#"{"metadata": {}, "weight_map": {"a.weight": "model-00001-of-00002.safetensors", "b.weight": "model-00002-of-00002.safetensors"}}"#,
    )
    .unwrap();
    fs::write(dir.join("config.json"), r#"{"model_type": "test"}"#).unwrap();
    fs::write(
        dir.join("1_Pooling/config.json"),
        r#"{"pooling_mode_mean_tokens": true}"#,
    )
    .unwrap();
    Models { dir, shard1, shard2 }
}

/// `sha256sum`-style lines for every file below `dir` (SHA256SUMS excluded).
fn sums(dir: &Path) -> String {
    let mut out = Vec::new();
    for rel in [
        "1_Pooling/config.json",
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ] {
        out.push(format!("{}  {rel}\n", sha256_hex(&fs::read(dir.join(rel)).unwrap())));
    }
    out.concat()
}

fn spec(uri: &str, pins: &[(&str, String)]) -> ModelWrapperSpec {
    let pins: Vec<String> = pins.iter().map(|(p, s)| format!("'{p}': '{s}'")).collect();
    serde_yaml::from_str(&format!(
        "pipeline: {{components: [{{name: llm, source: {{uri: '{uri}', sha256: {{{}}}}}}}]}}",
        pins.join(", ")
    ))
    .unwrap()
}

fn engine(root: &Path, policy: SourcePolicy) -> FillEngine {
    FillEngine::new(VolumeRoot::new(root), None, MountMode::Directory, policy).expect("engine")
}

fn cluster(tmp: &Path) -> SourcePolicy {
    SourcePolicy::cluster(vec![tmp.join("models")], vec![])
}

fn nothing_published(root: &Path) {
    assert!(VolumeRoot::new(root).generations().unwrap().is_empty());
    assert_eq!(
        fs::read_dir(root.join(".staging")).unwrap().count(),
        0,
        "staging left behind"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_directory_fills_as_a_sealed_v2_component_through_a_pinned_sums_file() {
    let tmp = TmpfsDir::new();
    let m = models(tmp.path());
    let text = sums(&m.dir);
    fs::write(m.dir.join("SHA256SUMS"), &text).unwrap();
    let root = tmp.path().join("root");
    let uri = format!("file://{}/", m.dir.display());
    let e = engine(&root, cluster(tmp.path()));
    let out = e
        .fill(
            "ns",
            "llm",
            &spec(&uri, &[("SHA256SUMS", sha256_hex(text.as_bytes()))]),
            &Quiet,
        )
        .await
        .expect("fill");
    let FillOutcome::Filled { manifest, .. } = out else {
        panic!("expected a fill")
    };
    assert_eq!(manifest.format, zerocopy_api::format::FORMAT_V2);
    let dir = manifest.components[0]
        .directory
        .as_ref()
        .expect("a directory component");
    assert_eq!(
        dir.weights,
        [
            "llm/model-00001-of-00002.safetensors",
            "llm/model-00002-of-00002.safetensors"
        ]
    );
    assert_eq!(dir.files.len(), 6, "{:?}", dir.files);
    let gen = VolumeRoot::new(&root).generation_dir("ns", "llm", &manifest.generation);
    assert_eq!(
        fs::read(gen.join("llm/model-00001-of-00002.safetensors")).unwrap(),
        m.shard1
    );
    assert_eq!(
        fs::read(gen.join("llm/model-00002-of-00002.safetensors")).unwrap(),
        m.shard2
    );
    for (path, mode) in [
        ("llm", 0o555),
        ("llm/1_Pooling", 0o555),
        ("llm/1_Pooling/config.json", 0o444),
    ] {
        let found = fs::metadata(gen.join(path)).unwrap().permissions().mode() & 0o777;
        assert_eq!(found, mode, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sums_file_counts_in_a_cluster_only_when_pinned() {
    let tmp = TmpfsDir::new();
    let m = models(tmp.path());
    // It even names itself: lines of an unpinned SHA256SUMS are not pins.
    let mut text = sums(&m.dir);
    text.push_str(&format!("{}  SHA256SUMS\n", "0".repeat(64)));
    fs::write(m.dir.join("SHA256SUMS"), &text).unwrap();
    let root = tmp.path().join("root");
    let uri = format!("file://{}/", m.dir.display());
    let pins = [("config.json", sha256_hex(&fs::read(m.dir.join("config.json")).unwrap()))];
    let err = engine(&root, cluster(tmp.path()))
        .fill("ns", "llm", &spec(&uri, &pins), &Quiet)
        .await
        .expect_err("unpinned SHA256SUMS");
    assert!(matches!(err, FillError::BadContent { .. }), "{err}");
    assert!(err.to_string().contains("SHA256SUMS is not pinned"), "{err}");
    nothing_published(&root);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_line_in_the_sums_file_fails_that_file() {
    let tmp = TmpfsDir::new();
    let m = models(tmp.path());
    let text = sums(&m.dir).replace(
        &sha256_hex(&fs::read(m.dir.join("config.json")).unwrap()),
        &"e".repeat(64),
    );
    fs::write(m.dir.join("SHA256SUMS"), text).unwrap();
    let root = tmp.path().join("root");
    let err = engine(&root, SourcePolicy::standalone())
        .fill("ns", "llm", &spec(&format!("file://{}/", m.dir.display()), &[]), &Quiet)
        .await
        .expect_err("a wrong sum");
    let text = err.to_string();
    assert!(
        text.contains("sha256 mismatch") && text.contains("config.json"),
        "{text}"
    );
    nothing_published(&root);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_directories_are_refused_by_name() {
    let tmp = TmpfsDir::new();
    let m = models(tmp.path());
    let root = tmp.path().join("root");
    let uri = format!("file://{}/", m.dir.display());
    let standalone = || engine(&root, SourcePolicy::standalone());

    // A symlinked directory below the allowed one (to /etc) is not followed.
    std::os::unix::fs::symlink("/etc", tmp.path().join("models/etc")).unwrap();
    let linked = format!("file://{}/", tmp.path().join("models/etc").display());
    let err = engine(&root, cluster(tmp.path()))
        .fill("ns", "llm", &spec(&linked, &[("passwd", "a".repeat(64))]), &Quiet)
        .await
        .expect_err("symlinked directory");
    assert!(err.to_string().contains("goes through a symlink"), "{err}");

    // An index naming a shard that is not there.
    fs::remove_file(m.dir.join("model-00002-of-00002.safetensors")).unwrap();
    let err = standalone()
        .fill("ns", "llm", &spec(&uri, &[]), &Quiet)
        .await
        .expect_err("missing shard");
    assert!(
        err.to_string()
            .contains("names shard \"model-00002-of-00002.safetensors\""),
        "{err}"
    );

    // An auxiliary file too large to be a config (sparse: nothing is read).
    fs::write(m.dir.join("model-00002-of-00002.safetensors"), &m.shard2).unwrap();
    let big = fs::File::create(m.dir.join("tokenizer.json")).unwrap();
    big.set_len(200 << 20).unwrap();
    let err = standalone()
        .fill("ns", "llm", &spec(&uri, &[]), &Quiet)
        .await
        .expect_err("huge aux file");
    assert!(err.to_string().contains("tokenizer.json is 200.0 MiB"), "{err}");
    fs::remove_file(m.dir.join("tokenizer.json")).unwrap();

    // No safetensors at all (the other weight formats are left out).
    for shard in ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"] {
        fs::rename(m.dir.join(shard), m.dir.join(shard.replace(".safetensors", ".bin"))).unwrap();
    }
    let err = standalone()
        .fill("ns", "llm", &spec(&uri, &[]), &Quiet)
        .await
        .expect_err("no safetensors");
    let text = err.to_string();
    assert!(
        text.contains("no .safetensors file") && text.contains("model-00001-of-00002.bin"),
        "{text}"
    );
    nothing_published(&root);
}
