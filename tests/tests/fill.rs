//! Fill engine against real tmpfs mounts and a real HTTP server on 127.0.0.1.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: panics are the failure report

use std::fs;
use std::path::Path;

use zerocopy_api::format::generation_digest;
use zerocopy_api::ModelWrapperSpec;
use zerocopy_integration_tests::http::{Fault, Server};
use zerocopy_integration_tests::safetensors::{file, raw, T};
use zerocopy_integration_tests::{sha256_hex, TmpfsDir};
use zerocopy_node_agent::fill::{MountMode, Quiet};
use zerocopy_node_agent::mount::{mount_at, mounts_under};
use zerocopy_node_agent::source::policy::SourcePolicy;
use zerocopy_node_agent::{FillEngine, FillError, FillOutcome, VolumeRoot};

fn spec(yaml: &str) -> ModelWrapperSpec {
    serde_yaml::from_str(yaml).expect("spec yaml")
}

fn one(uri: &str, sha: Option<&str>) -> ModelWrapperSpec {
    let sha = sha.map(|s| format!(", sha256: {s}")).unwrap_or_default();
    spec(&format!(
        "pipeline: {{components: [{{name: enc, weights: {{uri: '{uri}'{sha}}}}}]}}"
    ))
}

fn model() -> Vec<u8> {
    file(&[T::f32("w", 300_000, 1), T::f32("b", 300, 2)])
}

fn engine(root: &Path, capacity: Option<u64>, mode: MountMode) -> FillEngine {
    FillEngine::new(VolumeRoot::new(root), capacity, mode, SourcePolicy::standalone()).expect("engine")
}

/// Nothing is visible and nothing is left in staging.
fn assert_nothing_published(root: &Path) {
    let gens = VolumeRoot::new(root).generations().expect("list");
    assert!(gens.is_empty(), "generations became visible: {gens:?}");
    let staging: Vec<_> = fs::read_dir(root.join(".staging"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(staging.is_empty(), "staging left behind: {staging:?}");
    assert!(
        mounts_under(&root.join(".staging")).expect("mountinfo").is_empty(),
        "staging mount left behind"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn http_fill_publishes_a_read_only_tmpfs_generation() {
    let tmp = TmpfsDir::new();
    let server = Server::start(Fault::None);
    let body = model();
    let url = server.put("enc.safetensors", body.clone());
    let s = one(&url, Some(&sha256_hex(&body)));
    let e = engine(tmp.path(), None, MountMode::Tmpfs);
    let out = e.fill("test", "m", &s, &Quiet).await.expect("fill");
    let FillOutcome::Filled { manifest, .. } = out else {
        panic!("expected a fill")
    };
    let gen_dir = tmp.path().join("test/m").join(generation_digest(&s));
    assert_eq!(fs::read(gen_dir.join("enc.safetensors")).unwrap(), body);
    assert_eq!(manifest.components[0].weights.as_ref().map(|w| w.tensors), Some(2));
    assert_eq!(manifest.total_bytes, body.len() as u64);
    let m = mount_at(&gen_dir).unwrap().expect("generation is its own mount");
    assert_eq!(m.fs_type, "tmpfs");
    assert!(m.mount_options.split(',').any(|o| o == "ro"), "{m:?}");
    let err = fs::write(gen_dir.join("x"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc_erofs()), "{err}");
    // a second fill reads nothing
    let before = server.requests.load(std::sync::atomic::Ordering::SeqCst);
    assert!(matches!(
        e.fill("test", "m", &s, &Quiet).await.unwrap(),
        FillOutcome::UpToDate(_)
    ));
    assert_eq!(server.requests.load(std::sync::atomic::Ordering::SeqCst), before);
    assert!(fs::read_dir(tmp.path().join(".staging")).unwrap().next().is_none());
}

fn libc_erofs() -> i32 {
    nix::errno::Errno::EROFS as i32
}

#[tokio::test(flavor = "multi_thread")]
async fn huge_pages_reach_the_tmpfs_mount() {
    let tmp = TmpfsDir::new();
    let src = tmp.path().join("src.safetensors");
    fs::write(&src, model()).unwrap();
    let mut s = one(&format!("file://{}", src.display()), None);
    s.memory.huge_pages = true;
    let e = engine(&tmp.path().join("root"), None, MountMode::Tmpfs);
    e.fill("test", "m", &s, &Quiet).await.expect("fill");
    let gen_dir = tmp.path().join("root/test/m").join(generation_digest(&s));
    let m = mount_at(&gen_dir).unwrap().expect("mount");
    assert!(m.super_options.contains("huge=within_size"), "{m:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn directory_mode_publishes_by_rename() {
    let tmp = TmpfsDir::new();
    let src = tmp.path().join("src.safetensors");
    fs::write(&src, model()).unwrap();
    let s = one(&format!("file://{}", src.display()), None);
    let e = engine(&tmp.path().join("root"), None, MountMode::Directory);
    assert!(!e.uses_tmpfs());
    e.fill("test", "m", &s, &Quiet).await.expect("fill");
    let gen_dir = tmp.path().join("root/test/m").join(generation_digest(&s));
    assert!(mount_at(&gen_dir).unwrap().is_none());
    assert_eq!(fs::read(gen_dir.join("enc.safetensors")).unwrap(), model());
    assert!(gen_dir.join("manifest.json").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dropped_connection_is_resumed_with_range() {
    let tmp = TmpfsDir::new();
    let server = Server::start(Fault::TruncateOnce);
    let body = model();
    let url = server.put("enc.safetensors", body.clone());
    let s = one(&url, Some(&sha256_hex(&body)));
    engine(tmp.path(), None, MountMode::Tmpfs)
        .fill("test", "m", &s, &Quiet)
        .await
        .expect("resumed fill");
    let gen_dir = tmp.path().join("test/m").join(generation_digest(&s));
    assert_eq!(fs::read(gen_dir.join("enc.safetensors")).unwrap(), body);
    // The resume asked for the rest, not the whole body again.
    let starts = server.range_starts.lock().unwrap().clone();
    assert_eq!(starts, vec![body.len() as u64 / 2], "one resume from the cut");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_large_object_arrives_as_concurrent_ranges_hashed_in_order() {
    use zerocopy_node_agent::source::http::RANGED_MIN;
    let tmp = TmpfsDir::new();
    let n = (RANGED_MIN + (3 << 20)) as usize;
    let data: Vec<u8> = (0..n).map(|i| (i.wrapping_mul(31) % 251) as u8).collect();
    let header = format!(r#"{{"w":{{"dtype":"U8","shape":[{n}],"data_offsets":[0,{n}]}}}}"#);
    let body = raw(&header, &data);
    let part = (body.len() as u64).div_ceil(4).next_multiple_of(1 << 20);
    let boundaries: Vec<u64> = (0..4).map(|i| i * part).collect();
    for (fault, root) in [(Fault::None, "plain"), (Fault::TruncateOnce, "cut")] {
        let server = Server::start(fault);
        let url = server.put("big.safetensors", body.clone());
        let s = one(&url, Some(&sha256_hex(&body)));
        let root = tmp.path().join(root);
        engine(&root, None, MountMode::Directory)
            .fill("test", "m", &s, &Quiet)
            .await
            .expect("ranged fill");
        let gen_dir = root.join("test/m").join(generation_digest(&s));
        assert!(
            fs::read(gen_dir.join("enc.safetensors")).unwrap() == body,
            "{fault:?}: bytes differ"
        );
        let mut starts = server.range_starts.lock().unwrap().clone();
        starts.sort_unstable();
        match fault {
            // Four concurrent parts, one request each.
            Fault::None => assert_eq!(starts, boundaries),
            // The first part was cut at half and resumed from there, not from 0.
            _ => assert_eq!(starts, [0, part / 2, part, 2 * part, 3 * part]),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_resume_never_splices_two_versions_of_an_object() {
    let tmp = TmpfsDir::new();
    let server = Server::start(Fault::TruncateOnce);
    let old = model();
    let new = file(&[T::f32("w", 300_000, 9), T::f32("b", 300, 9)]);
    assert_eq!(old.len(), new.len());
    let url = server.put("enc.safetensors", old.clone());
    // A new version of the object lands right after the first body is cut:
    // the resume's If-Range no longer matches, the server sends the whole new
    // body, and the agent must not append it to the old half.
    server.replace_after_cut("enc.safetensors", new.clone());
    let s = one(&url, None);
    engine(tmp.path(), None, MountMode::Tmpfs)
        .fill("test", "m", &s, &Quiet)
        .await
        .expect_err("a changed object cannot be resumed");
    assert_nothing_published(tmp.path());
    let spliced: Vec<u8> = old[..old.len() / 2]
        .iter()
        .chain(&new[new.len() / 2..])
        .copied()
        .collect();
    assert_ne!(spliced, old);
}

/// One bad input: what the source serves, and what the error must say.
struct Case {
    what: &'static str,
    body: Vec<u8>,
    sha: Option<String>,
    category: &'static str,
    says: &'static [&'static str],
}

fn header_case(what: &'static str, header: &str, data: usize, says: &'static [&'static str]) -> Case {
    Case {
        what,
        body: raw(header, &vec![0u8; data]),
        sha: None,
        category: "bad_header",
        says,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_bad_source_fails_by_name_and_publishes_nothing() {
    let good = model();
    let t = |dtype: &str, shape: &str, b: u64, e: u64| {
        format!(r#"{{"t":{{"dtype":"{dtype}","shape":{shape},"data_offsets":[{b},{e}]}}}}"#)
    };
    let mut huge_prefix = (200u64 * 1024 * 1024).to_le_bytes().to_vec();
    huge_prefix.extend_from_slice(b"{}");
    let cases = vec![
        Case {
            what: "too short",
            body: vec![1, 2, 3],
            sha: None,
            category: "bad_header",
            says: &["too short"],
        },
        Case {
            what: "header over the limit",
            body: huge_prefix,
            sha: None,
            category: "bad_header",
            says: &["exceeds"],
        },
        Case {
            what: "header beyond the file",
            body: {
                let mut b = 64u64.to_le_bytes().to_vec();
                b.extend_from_slice(b"{}");
                b
            },
            sha: None,
            category: "bad_header",
            says: &["does not fit"],
        },
        header_case("not JSON", "{not json", 0, &["not valid safetensors JSON"]),
        header_case("unknown dtype", &t("Q3", "[1]", 0, 1), 1, &["unsupported dtype"]),
        header_case("span mismatch", &t("F32", "[3]", 0, 8), 8, &["needs 12 bytes"]),
        header_case("out of bounds", &t("F32", "[4]", 0, 16), 8, &["truncated"]),
        header_case(
            "overlap",
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
            8,
            &["overlap"],
        ),
        header_case("gap", &t("F32", "[1]", 4, 8), 8, &["belong to no tensor"]),
        header_case(
            "misaligned",
            r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"b":{"dtype":"F32","shape":[1],"data_offsets":[1,5]}}"#,
            5,
            &["not a multiple of 4"],
        ),
        Case {
            what: "sha256 mismatch",
            body: good.clone(),
            sha: Some("0".repeat(64)),
            category: "digest_mismatch",
            says: &["sha256 mismatch", "expected 0000"],
        },
    ];
    for c in cases {
        let tmp = TmpfsDir::new();
        let src = tmp.path().join("src.safetensors");
        fs::write(&src, &c.body).unwrap();
        let root = tmp.path().join("root");
        let s = one(&format!("file://{}", src.display()), c.sha.as_deref());
        let err = engine(&root, None, MountMode::Tmpfs)
            .fill("test", "m", &s, &Quiet)
            .await
            .expect_err(c.what);
        assert_eq!(err.category(), c.category, "{}: {err}", c.what);
        let msg = err.to_string();
        assert!(msg.contains("component enc"), "{}: {msg}", c.what);
        for want in c.says {
            assert!(msg.contains(want), "{}: {msg:?} lacks {want:?}", c.what);
        }
        assert_nothing_published(&root);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn http_failures_fail_by_name_and_publish_nothing() {
    let good = model();
    let truncating = Server::start(Fault::TruncateAlways);
    let truncated_url = truncating.put("enc.safetensors", good.clone());
    let ok = Server::start(Fault::None);
    let missing_url = format!("{}/missing.safetensors", ok.base);
    // a port that was free a moment ago: connection refused
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let unreachable_url = format!("http://{closed}/enc.safetensors");
    for (url, category, says) in [
        (truncated_url, "truncated", vec!["truncated body", "of 1201344 bytes"]),
        (missing_url, "http_status", vec!["HTTP 404", "does not exist"]),
        (unreachable_url, "source", vec!["cannot read", "onnect"]),
    ] {
        let tmp = TmpfsDir::new();
        let err = engine(tmp.path(), None, MountMode::Tmpfs)
            .fill("test", "m", &one(&url, None), &Quiet)
            .await
            .expect_err(&url);
        assert_eq!(err.category(), category, "{err}");
        let msg = err.to_string();
        assert!(msg.contains("component enc"), "{msg}");
        for want in says {
            assert!(msg.contains(want), "{msg:?} lacks {want:?}");
        }
        assert_nothing_published(tmp.path());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_names_and_capacity_are_refused_before_any_byte() {
    let tmp = TmpfsDir::new();
    let src = tmp.path().join("src.safetensors");
    fs::write(&src, model()).unwrap();
    let uri = format!("file://{}", src.display());
    let root = tmp.path().join("root");
    let e = engine(&root, None, MountMode::Tmpfs);

    let traversal = spec(&format!(
        "pipeline: {{components: [{{name: '../x', weights: {{uri: '{uri}'}}}}]}}"
    ));
    let err = e.fill("test", "m", &traversal, &Quiet).await.unwrap_err();
    assert!(
        matches!(err, FillError::Invalid(_)) && err.to_string().contains("\"../x\" is not a DNS-1123 label"),
        "{err}"
    );

    let dup = spec(&format!(
        "pipeline: {{components: [{{name: a, weights: {{uri: '{uri}'}}}}, {{name: a, weights: {{uri: '{uri}'}}}}]}}"
    ));
    let err = e.fill("test", "m", &dup, &Quiet).await.unwrap_err();
    assert!(err.to_string().contains("duplicate component name \"a\""), "{err}");
    assert_nothing_published(&root);
    drop(e); // one engine per root at a time (the root lock)

    let small = engine(&root, Some(1 << 20), MountMode::Tmpfs);
    let err = small.fill("test", "m", &one(&uri, None), &Quiet).await.unwrap_err();
    assert_eq!(err.category(), "capacity");
    let msg = err.to_string();
    assert!(
        msg.contains("needs 1.1 MiB") && msg.contains("1.0 MiB capacity") && msg.contains("--capacity"),
        "{msg}"
    );
    assert_nothing_published(&root);
}
