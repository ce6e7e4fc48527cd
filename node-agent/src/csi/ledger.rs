//! The publication ledger: one JSON file per published volume under
//! `<state-dir>/publications/`, written (temp file + rename) before the mount
//! is made and before NodePublishVolume returns, so an agent restart knows
//! every mount it made. At start, records are checked against
//! `/proc/self/mountinfo`: a record whose target is not mounted (a crash
//! before the mount, or an unmount behind our back) is dropped; kubelet will
//! publish again if the pod still needs it.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::mount;

/// One publication.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Publication {
    /// Kubelet's volume id.
    pub volume_id: String,
    /// The bind mount.
    pub target: PathBuf,
    /// Wrapper namespace (the pod's).
    pub namespace: String,
    /// Wrapper name; empty for a catalog volume.
    pub name: String,
    /// Generation mounted; empty for a catalog volume.
    pub generation: String,
    /// The namespace catalog (every Ready wrapper of `namespace`), not one
    /// wrapper.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub catalog: bool,
    /// Pod name, for operators reading the ledger.
    #[serde(default)]
    pub pod: String,
    /// Pod UID.
    #[serde(default)]
    pub pod_uid: String,
    /// RFC 3339.
    pub published_at: String,
}

/// The ledger: on disk, mirrored in memory.
#[derive(Debug)]
pub struct Ledger {
    dir: PathBuf,
    records: Mutex<HashMap<String, Publication>>,
}

impl Ledger {
    /// Loads `<state_dir>/publications`, dropping records whose target is not
    /// mounted. Returns the ledger and the number of records dropped.
    pub fn load(state_dir: &Path) -> io::Result<(Self, usize)> {
        let dir = state_dir.join("publications");
        fs::create_dir_all(&dir)?;
        let mounted: std::collections::HashSet<PathBuf> = mount::mounts()?.into_iter().map(|m| m.mount_point).collect();
        let mut records = HashMap::new();
        let mut dropped = 0;
        for entry in fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "tmp") {
                fs::remove_file(&path)?;
                continue;
            }
            let record: Option<Publication> = fs::read(&path).ok().and_then(|b| serde_json::from_slice(&b).ok());
            match record {
                Some(r) if mounted.contains(&r.target) => {
                    records.insert(r.volume_id.clone(), r);
                }
                other => {
                    tracing::warn!(file = %path.display(), record = ?other, "dropping a publication whose target is not mounted");
                    fs::remove_file(&path)?;
                    dropped += 1;
                }
            }
        }
        Ok((
            Self {
                dir,
                records: Mutex::new(records),
            },
            dropped,
        ))
    }

    fn file(&self, volume_id: &str) -> PathBuf {
        let digest = hex::encode(Sha256::digest(volume_id.as_bytes()));
        self.dir.join(format!("{}.json", &digest[..32]))
    }

    /// Records a publication durably (before the mount is made).
    pub fn insert(&self, p: Publication) -> io::Result<()> {
        let path = self.file(&p.volume_id);
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, serde_json::to_vec_pretty(&p).map_err(io::Error::other)?)?;
        fs::File::open(&tmp)?.sync_all()?;
        fs::rename(&tmp, &path)?;
        // The rename is durable only once the directory is synced: a power
        // loss must not forget a publication kubelet was told about.
        if let Some(dir) = path.parent() {
            fs::File::open(dir)?.sync_all()?;
        }
        self.lock().insert(p.volume_id.clone(), p);
        Ok(())
    }

    /// Forgets a publication; absent is fine.
    pub fn remove(&self, volume_id: &str) -> io::Result<Option<Publication>> {
        match fs::remove_file(self.file(volume_id)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(self.lock().remove(volume_id))
    }

    /// The publication of `volume_id`.
    pub fn get(&self, volume_id: &str) -> Option<Publication> {
        self.lock().get(volume_id).cloned()
    }

    /// Every publication.
    pub fn all(&self) -> Vec<Publication> {
        let mut v: Vec<Publication> = self.lock().values().cloned().collect();
        v.sort_by(|a, b| a.volume_id.cmp(&b.volume_id));
        v
    }

    /// True when some publication mounts this generation.
    pub fn references(&self, namespace: &str, name: &str, generation: &str) -> bool {
        self.lock()
            .values()
            .any(|p| p.namespace == namespace && p.name == name && p.generation == generation)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Publication>> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }
}
