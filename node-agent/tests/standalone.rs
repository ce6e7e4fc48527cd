//! `zerocopy-node-agent standalone` and `status` as a user runs them: the real
//! binary, real tmpfs mounts, SIGKILL in the middle of a fill.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: panics are the failure report

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use zerocopy_integration_tests::http::{Fault, Server};
use zerocopy_integration_tests::safetensors::{file, T};
use zerocopy_integration_tests::{sha256_hex, wrapper_yaml, TmpfsDir};

const BIN: &str = env!("CARGO_BIN_EXE_zerocopy-node-agent");

fn agent(root: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--root")
        .arg(root)
        .args(args)
        .output()
        .expect("run agent")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn generations(root: &Path) -> Vec<serde_json::Value> {
    let o = agent(root, &["status", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    serde_json::from_slice(&o.stdout).expect("status json")
}

/// `standalone -q -f yaml` in the background, optionally stopping itself at a
/// failpoint (`ZEROCOPY_FAILPOINT`).
fn spawn_fill(root: &Path, yaml: &Path, failpoint: Option<&str>) -> std::process::Child {
    let mut cmd = Command::new(BIN);
    cmd.arg("--root")
        .arg(root)
        .args(["standalone", "-q", "-f", yaml.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(point) = failpoint {
        cmd.env("ZEROCOPY_FAILPOINT", point);
    }
    cmd.spawn().unwrap()
}

fn sigkill(child: &mut std::process::Child) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    child.wait().unwrap();
}

fn write_model(dir: &Path, name: &str, seed: u32) -> (PathBuf, String) {
    let body = file(&[T::f32("w", 100_000, seed)]);
    let path = dir.join(name);
    fs::write(&path, &body).unwrap();
    (path, sha256_hex(&body))
}

#[test]
fn same_yaml_fills_once_and_a_new_sha_fills_a_new_generation() {
    let tmp = TmpfsDir::new();
    let root = tmp.path().join("root");
    let (src, sha) = write_model(tmp.path(), "a.safetensors", 1);
    let yaml = tmp.path().join("mw.yaml");
    let uri = format!("file://{}", src.display());
    fs::write(&yaml, wrapper_yaml("bert", &[("enc", &uri, Some(&sha))])).unwrap();

    let first = agent(&root, &["standalone", "-f", yaml.to_str().unwrap()]);
    assert!(first.status.success(), "{}", text(&first));
    assert!(text(&first).contains("filled"), "{}", text(&first));
    let gens = generations(&root);
    assert_eq!(gens.len(), 1);
    let manifest = PathBuf::from(gens[0]["path"].as_str().unwrap()).join("manifest.json");
    let created = fs::metadata(&manifest).unwrap().modified().unwrap();

    let second = agent(&root, &["standalone", "-f", yaml.to_str().unwrap()]);
    assert!(second.status.success(), "{}", text(&second));
    assert!(text(&second).contains("up to date"), "{}", text(&second));
    assert_eq!(
        fs::metadata(&manifest).unwrap().modified().unwrap(),
        created,
        "second run rewrote the generation"
    );

    // new content, new sha: a new generation, the old one removed (nothing maps it)
    let (src2, sha2) = write_model(tmp.path(), "b.safetensors", 2);
    fs::write(
        &yaml,
        wrapper_yaml("bert", &[("enc", &format!("file://{}", src2.display()), Some(&sha2))]),
    )
    .unwrap();
    let third = agent(&root, &["standalone", "-f", yaml.to_str().unwrap()]);
    assert!(third.status.success(), "{}", text(&third));
    let after = generations(&root);
    assert_eq!(after.len(), 1, "{after:?}");
    assert_ne!(after[0]["generation"], gens[0]["generation"]);
    assert!(
        text(&third).contains(&format!(
            "removed test/bert generation {}",
            gens[0]["generation"].as_str().unwrap()
        )),
        "{}",
        text(&third)
    );
    assert_eq!(after[0]["state"], "Ready");
    // The root is on a tmpfs: generations are directories of it, so a
    // namespace catalog mount sees new ones without a remount.
    assert_eq!(after[0]["backing"], "directory");
}

#[test]
fn an_old_generation_in_use_is_kept_until_released() {
    let tmp = TmpfsDir::new();
    let root = tmp.path().join("root");
    let yaml = tmp.path().join("mw.yaml");
    let (src, sha) = write_model(tmp.path(), "a.safetensors", 1);
    fs::write(
        &yaml,
        wrapper_yaml("m", &[("enc", &format!("file://{}", src.display()), Some(&sha))]),
    )
    .unwrap();
    assert!(agent(&root, &["standalone", "-f", yaml.to_str().unwrap()])
        .status
        .success());
    let old = PathBuf::from(generations(&root)[0]["path"].as_str().unwrap().to_string());
    // a reader holding the old weights open
    let mut reader = Command::new("sleep")
        .arg("30")
        .stdin(fs::File::open(old.join("enc.safetensors")).unwrap())
        .spawn()
        .unwrap();

    let (src2, sha2) = write_model(tmp.path(), "b.safetensors", 2);
    fs::write(
        &yaml,
        wrapper_yaml("m", &[("enc", &format!("file://{}", src2.display()), Some(&sha2))]),
    )
    .unwrap();
    let o = agent(&root, &["standalone", "-f", yaml.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains(&format!("in use by pid {}", reader.id())),
        "{}",
        text(&o)
    );
    assert_eq!(generations(&root).len(), 2);

    reader.kill().unwrap();
    reader.wait().unwrap();
    assert!(agent(&root, &["standalone", "-f", yaml.to_str().unwrap()])
        .status
        .success());
    assert_eq!(generations(&root).len(), 1);
}

#[test]
fn invalid_files_list_every_problem_and_fill_nothing() {
    let tmp = TmpfsDir::new();
    let root = tmp.path().join("root");
    let yaml = tmp.path().join("bad.yaml");
    fs::write(
        &yaml,
        "apiVersion: zerocopy.dev/v1alpha1\nkind: ModelWrapper\nmetadata: {name: m}\nspec:\n  pipeline:\n    components:\n      - {name: ../x, weights: {uri: 'file:///a', sha256: nope}}\n      - {name: b, weights: {uri: 'ftp://h/b'}}\n      - {name: b, weights: {uri: 'file:///b'}}\n",
    )
    .unwrap();
    let o = agent(&root, &["standalone", "-f", yaml.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let t = text(&o);
    for want in [
        "default/m is invalid (4 problems)",
        "\"../x\"",
        "64 hex",
        "ftp://",
        "duplicate component name \"b\"",
        "nothing was filled",
    ] {
        assert!(t.contains(want), "{t:?} lacks {want:?}");
    }
    assert!(generations(&root).is_empty());

    let o = agent(
        &root,
        &["standalone", "-f", tmp.path().join("missing.yaml").to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("missing.yaml"), "{}", text(&o));
}

#[test]
fn a_failed_fill_exits_1_and_names_the_component() {
    let tmp = TmpfsDir::new();
    let root = tmp.path().join("root");
    let (src, _) = write_model(tmp.path(), "a.safetensors", 1);
    let yaml = tmp.path().join("mw.yaml");
    fs::write(
        &yaml,
        wrapper_yaml(
            "m",
            &[("enc", &format!("file://{}", src.display()), Some(&"ab".repeat(32)))],
        ),
    )
    .unwrap();
    let o = agent(&root, &["standalone", "-f", yaml.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("component enc: sha256 mismatch"), "{}", text(&o));
    assert!(generations(&root).is_empty());
}

/// Every generation directory with content has its manifest and files whole.
fn assert_only_complete_generations_visible(root: &Path) {
    let Ok(namespaces) = fs::read_dir(root) else {
        return;
    };
    for ns in namespaces
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
    {
        for w in fs::read_dir(ns.path()).into_iter().flatten().flatten() {
            for g in fs::read_dir(w.path()).into_iter().flatten().flatten() {
                let entries: Vec<_> = fs::read_dir(g.path()).into_iter().flatten().flatten().collect();
                if entries.is_empty() {
                    continue; // a mount point waiting for its bind: shows nothing
                }
                let manifest: zerocopy_api::Manifest = serde_json::from_slice(
                    &fs::read(g.path().join("manifest.json")).expect("content without a manifest was visible"),
                )
                .unwrap();
                for f in manifest.files() {
                    assert_eq!(
                        fs::metadata(g.path().join(&f.file)).unwrap().len(),
                        f.bytes,
                        "partial file visible"
                    );
                }
            }
        }
    }
}

#[test]
fn sigkill_mid_fill_leaves_nothing_visible_and_the_next_run_completes() {
    let tmp = TmpfsDir::new();
    let root = tmp.path().join("root");
    let server = Server::start(Fault::Slow);
    let body = file(&[T::f32("w", 2_000_000, 3)]); // 8 MB at ~3 MB/s
    let url = server.put("enc.safetensors", body.clone());
    let yaml = tmp.path().join("mw.yaml");
    fs::write(&yaml, wrapper_yaml("m", &[("enc", &url, Some(&sha256_hex(&body)))])).unwrap();

    let mut child = spawn_fill(&root, &yaml, None);
    let staging = root.join(".staging");
    let deadline = Instant::now() + Duration::from_secs(20);
    let staged_bytes = |p: &Path| -> u64 {
        fs::read_dir(p)
            .into_iter()
            .flatten()
            .flatten()
            .flat_map(|d| fs::read_dir(d.path()).into_iter().flatten().flatten())
            .map(|f| f.metadata().map(|m| m.len()).unwrap_or(0))
            .sum()
    };
    while staged_bytes(&staging) < 1_000_000 {
        assert!(Instant::now() < deadline, "fill never started");
        assert_only_complete_generations_visible(&root);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_only_complete_generations_visible(&root);
    sigkill(&mut child);
    assert!(
        staged_bytes(&staging) > 0,
        "the killed fill should have left staging behind"
    );
    assert!(generations(&root).is_empty(), "a killed fill published something");

    let o = agent(&root, &["standalone", "-q", "-f", yaml.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("removed leftovers of interrupted fills"),
        "{}",
        text(&o)
    );
    let gens = generations(&root);
    assert_eq!(gens.len(), 1);
    assert_eq!(
        fs::read(PathBuf::from(gens[0]["path"].as_str().unwrap()).join("enc.safetensors")).unwrap(),
        body
    );
    assert_eq!(staged_bytes(&staging), 0);
}

/// SIGKILL exactly in the publish step (the agent stops itself at a
/// failpoint first): before the staging directory is renamed into place, and
/// after it but before `current` points at it. Either way nothing partial is
/// visible, and a rerun ends with one complete generation that `current`
/// names.
#[test]
fn a_sigkill_in_the_publish_step_leaves_nothing_partial_and_a_rerun_completes() {
    for point in ["fill:before-publish", "fill:before-current"] {
        let tmp = TmpfsDir::new();
        let root = tmp.path().join("root");
        let (src, sha) = write_model(tmp.path(), "a.safetensors", 3);
        let yaml = tmp.path().join("mw.yaml");
        let uri = format!("file://{}", src.display());
        fs::write(&yaml, wrapper_yaml("m", &[("enc", &uri, Some(&sha))])).unwrap();

        let mut child = spawn_fill(&root, &yaml, Some(point));
        let stopped = || {
            fs::read_to_string(format!("/proc/{}/stat", child.id()))
                .ok()
                .and_then(|s| s.rsplit(')').next().map(|rest| rest.trim_start().starts_with('T')))
                .unwrap_or(false)
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !stopped() {
            assert!(
                Instant::now() < deadline,
                "{point}: the agent never reached its failpoint"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_only_complete_generations_visible(&root);
        sigkill(&mut child);
        assert_only_complete_generations_visible(&root);

        let o = agent(&root, &["standalone", "-q", "-f", yaml.to_str().unwrap()]);
        assert!(o.status.success(), "{point}: {}", text(&o));
        let gens = generations(&root);
        assert_eq!(gens.len(), 1, "{point}: {gens:?}");
        let path = PathBuf::from(gens[0]["path"].as_str().unwrap());
        assert_eq!(
            fs::read(path.join("enc.safetensors")).unwrap(),
            fs::read(&src).unwrap(),
            "{point}"
        );
        let current = fs::read_link(path.parent().unwrap().join("current")).unwrap();
        assert_eq!(
            current,
            PathBuf::from(path.file_name().unwrap()),
            "{point}: current names the generation"
        );
        assert!(
            fs::read_dir(root.join(".staging")).map(|d| d.count()).unwrap_or(0) == 0,
            "{point}: leftovers of the killed fill were removed"
        );
    }
}

/// `ShmemPmdMapped` of this process's mapping that starts at `addr`, in KiB.
fn shmem_pmd_mapped_kib(addr: usize) -> u64 {
    let smaps = fs::read_to_string("/proc/self/smaps").unwrap();
    let mut in_block = false;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ') {
            if let Some((start, _)) = range.split_once('-') {
                if let Ok(start) = usize::from_str_radix(start, 16) {
                    in_block = start == addr;
                    continue;
                }
            }
        }
        if in_block {
            if let Some(v) = line.strip_prefix("ShmemPmdMapped:") {
                return v.trim().trim_end_matches("kB").trim().parse().unwrap();
            }
        }
    }
    panic!("no smaps block at {addr:#x}");
}

#[test]
fn an_empty_root_gets_the_agents_huge_page_tmpfs_which_later_runs_reuse() {
    let tmp = TmpfsDir::new();
    let root = tmp.path().join("root");
    // 16 MiB of weights: whole 2 MiB pages.
    let body = file(&[T::f32("w", 4 << 20, 7)]);
    let src = tmp.path().join("w.safetensors");
    fs::write(&src, &body).unwrap();
    let yaml = tmp.path().join("mw.yaml");
    let uri = format!("file://{}", src.display());
    fs::write(&yaml, wrapper_yaml("big", &[("enc", &uri, Some(&sha256_hex(&body)))])).unwrap();
    let fill = |extra: &[&str]| {
        let mut args = vec!["standalone", "-f", yaml.to_str().unwrap(), "--root-tmpfs", "auto"];
        args.extend_from_slice(extra);
        let out = agent(&root, &args);
        assert!(out.status.success(), "{}", text(&out));
        out
    };
    let mounts_at_root = || {
        zerocopy_node_agent::mount::mounts()
            .unwrap()
            .into_iter()
            .filter(|m| m.mount_point == root)
            .collect::<Vec<_>>()
    };

    let first = fill(&[]);
    assert!(
        text(&first).contains("mounted the agent's tmpfs at the volume root"),
        "{}",
        text(&first)
    );
    let at_root = mounts_at_root();
    assert_eq!(at_root.len(), 1, "{at_root:?}");
    assert_eq!(at_root[0].fs_type, "tmpfs");
    assert!(at_root[0].super_options.contains("huge=within_size"), "{at_root:?}");
    let gens = generations(&root);
    assert_eq!(
        gens[0]["backing"], "directory",
        "generations stay directories of the root"
    );
    let dir = PathBuf::from(gens[0]["path"].as_str().unwrap());
    let manifest: serde_json::Value = serde_json::from_slice(&fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["hugePages"], true, "{manifest}");

    // Where this kernel grants tmpfs huge pages at all, the weights got them.
    let staged = fs::File::open(dir.join("enc.safetensors")).unwrap();
    // SAFETY: a read-only mapping of a file nothing writes while the test runs.
    #[allow(unsafe_code)]
    let map = unsafe { memmap2::Mmap::map(&staged) }.unwrap();
    let checksum: u64 = map.iter().step_by(4096).map(|&b| u64::from(b)).sum();
    assert!(checksum > 0);
    let pmd_kib = shmem_pmd_mapped_kib(map.as_ptr() as usize);
    let probe_dir = tempfile::tempdir_in(tmp.path()).unwrap();
    if zerocopy_node_agent::hugepages::probe(probe_dir.path()).granted {
        assert!(
            pmd_kib >= 2048,
            "the weights were staged with 4 KiB pages (ShmemPmdMapped {pmd_kib} kB)"
        );
    }
    drop(map);

    // A second run finds the mount and uses it; nothing is stacked on it.
    let second = fill(&[]);
    assert!(text(&second).contains("up to date"), "{}", text(&second));
    assert_eq!(mounts_at_root().len(), 1);

    // In a container the root is a bind of the host's directory (a hostPath
    // volume): a mount point, but not a filesystem of ours; the tmpfs goes on top.
    let host_dir = tmp.path().join("host-shm/zerocopy");
    fs::create_dir_all(&host_dir).unwrap();
    let pod_root = tmp.path().join("pod-root");
    fs::create_dir_all(&pod_root).unwrap();
    nix::mount::mount(
        Some(&host_dir),
        &pod_root,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .unwrap();
    let out = agent(
        &pod_root,
        &["standalone", "-f", yaml.to_str().unwrap(), "--root-tmpfs", "auto"],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("mounted the agent's tmpfs at the volume root"),
        "{}",
        text(&out)
    );
    let top = zerocopy_node_agent::mount::mount_at(&pod_root).unwrap().unwrap();
    assert_eq!(top.root, PathBuf::from("/"));
    assert!(top.super_options.contains("huge=within_size"), "{top:?}");

    // A root that already holds generations is never hidden under a mount.
    let old_root = tmp.path().join("old-root");
    let out = agent(&old_root, &["standalone", "-f", yaml.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let out = agent(
        &old_root,
        &["standalone", "-f", yaml.to_str().unwrap(), "--root-tmpfs", "auto"],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("the root already holds"), "{}", text(&out));
    assert!(text(&out).contains("up to date"), "{}", text(&out));
    assert!(zerocopy_node_agent::mount::mount_at(&old_root).unwrap().is_none());
}
