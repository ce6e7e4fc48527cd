//! Helpers for the one-node integration tests: a real HTTP server on
//! 127.0.0.1 with fault modes, safetensors files built byte by byte, and
//! ModelWrapper YAML.

// Test support: a failed setup should panic the test that called it.
#![allow(clippy::expect_used, clippy::unwrap_used)]

pub mod http;
pub mod safetensors;

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Lowercase hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The node agent binary cargo built for this test run.
pub fn agent_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/<test> → target/<profile>/zerocopy-node-agent
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    dir.join("zerocopy-node-agent")
}

/// A one-wrapper YAML document.
pub fn wrapper_yaml(name: &str, components: &[(&str, &str, Option<&str>)]) -> String {
    let mut s = format!("apiVersion: zerocopy.dev/v1alpha1\nkind: ModelWrapper\nmetadata: {{name: {name}, namespace: test}}\nspec:\n  pipeline:\n    components:\n");
    for (cname, uri, sha) in components {
        s.push_str(&format!("      - name: {cname:?}\n        weights: {{uri: {uri:?}"));
        if let Some(sha) = sha {
            s.push_str(&format!(", sha256: {sha:?}"));
        }
        s.push_str("}\n");
    }
    s
}

/// A private tmpfs for one test, unmounted (with everything below it) on drop.
pub struct TmpfsDir {
    dir: tempfile::TempDir,
}

impl TmpfsDir {
    /// Mounts a 2 GiB tmpfs on a fresh temporary directory (tests run as root).
    pub fn new() -> Self {
        Self::with_size("2g")
    }

    /// A tmpfs of `size` (`12g`): a limit, not an allocation.
    pub fn with_size(size: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        nix::mount::mount(
            Some("test"),
            dir.path(),
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(format!("size={size},mode=0755").as_str()),
        )
        .expect("mount tmpfs (the integration tests run as root)");
        Self { dir }
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Default for TmpfsDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TmpfsDir {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(self.dir.path(), nix::mount::MntFlags::MNT_DETACH);
    }
}
