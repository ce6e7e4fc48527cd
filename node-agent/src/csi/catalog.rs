//! What the node should hold: for each ModelWrapper, the generation it wants
//! (from the YAML files in standalone mode, from ModelReplicas in a cluster),
//! and the progress or failure of its fill. NodePublishVolume reads it; the
//! fill loop writes it and wakes waiting publishes.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use zerocopy_api::format::generation_digest;
use zerocopy_api::quantity::HumanBytes;
use zerocopy_api::ModelWrapperSpec;

use crate::fill::ProgressFactory;
use crate::source::Progress;

/// `(namespace, name)`
pub type WrapperKey = (String, String);

/// A wrapper this node should serve.
#[derive(Debug, Clone)]
pub struct Wanted {
    /// Its spec.
    pub spec: ModelWrapperSpec,
    /// The generation the spec resolves to.
    pub generation: String,
    /// sha256 of the token an uploader of its `upload:` sources presents
    /// (the wrapper's `zerocopy.dev/upload-token-sha256` annotation).
    pub upload_token_sha256: Option<String>,
}

/// Where a generation's fill stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FillState {
    /// Not started yet.
    Pending,
    /// Streaming: per file, (component, bytes done, bytes total if known).
    Filling(Vec<(String, u64, Option<u64>)>),
    /// Published.
    Ready,
    /// Failed; tried again at `retry_at` unless the spec changes first.
    Failed(Failure),
}

/// The failure reason of a fill that waits for an upload or a peer.
pub const WAITING_FOR_SOURCE: &str = "WaitingForSource";

/// A failed fill, as status and publishes report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// What failed: names the component and what to do.
    pub message: String,
    /// `SourceUnavailable`, `IntegrityMismatch`, `InsufficientCapacity`, …
    pub reason: &'static str,
    /// Failed attempts in a row.
    pub attempts: u32,
    /// When the next attempt starts; `None` when only a spec change helps.
    pub retry_at: Option<std::time::SystemTime>,
}

impl Failure {
    /// "…: <message>; attempt 3, next in 40s" for publish errors and status.
    pub fn describe(&self) -> String {
        match self.retry_at {
            Some(at) => {
                let wait = at
                    .duration_since(std::time::SystemTime::now())
                    .map_or(0, |d| d.as_secs());
                format!("{} (attempt {}; next attempt in {wait}s)", self.message, self.attempts)
            }
            None => format!("{} (not retried: fix the spec)", self.message),
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    wanted: BTreeMap<WrapperKey, Wanted>,
    fills: HashMap<(String, String, String), FillState>,
}

/// Shared between the fill loop and the CSI server.
#[derive(Debug, Default)]
pub struct Catalog {
    inner: Mutex<Inner>,
    /// Woken whenever a fill state changes.
    pub changed: Notify,
}

impl Catalog {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces the set of wanted wrappers.
    pub fn set_wanted(&self, wrappers: impl IntoIterator<Item = (WrapperKey, ModelWrapperSpec, Option<String>)>) {
        let wanted = wrappers
            .into_iter()
            .map(|(k, spec, upload_token_sha256)| {
                (
                    k,
                    Wanted {
                        generation: generation_digest(&spec),
                        spec,
                        upload_token_sha256,
                    },
                )
            })
            .collect();
        self.lock().wanted = wanted;
        self.changed.notify_waiters();
    }

    /// The wanted generation of a wrapper.
    pub fn wanted(&self, namespace: &str, name: &str) -> Option<Wanted> {
        self.lock()
            .wanted
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
    }

    /// Every wanted wrapper.
    pub fn all_wanted(&self) -> Vec<(WrapperKey, Wanted)> {
        self.lock().wanted.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// True when `generation` is the wanted one of its wrapper.
    pub fn is_wanted(&self, namespace: &str, name: &str, generation: &str) -> bool {
        self.wanted(namespace, name).is_some_and(|w| w.generation == generation)
    }

    /// Sets a fill's state and wakes waiters.
    pub fn set_state(&self, namespace: &str, name: &str, generation: &str, state: FillState) {
        self.lock()
            .fills
            .insert((namespace.into(), name.into(), generation.into()), state);
        self.changed.notify_waiters();
    }

    /// A fill's state.
    pub fn state(&self, namespace: &str, name: &str, generation: &str) -> FillState {
        self.lock()
            .fills
            .get(&(namespace.into(), name.into(), generation.into()))
            .cloned()
            .unwrap_or(FillState::Pending)
    }

    /// A progress sink for one generation's fill.
    pub fn progress(self: &Arc<Self>, namespace: &str, name: &str, generation: &str) -> CatalogProgress {
        CatalogProgress {
            catalog: self.clone(),
            key: (namespace.into(), name.into(), generation.into()),
        }
    }
}

/// "filling encoder 3.1 GiB/6.0 GiB, decoder 0 B/1.0 GiB"
pub fn describe_progress(files: &[(String, u64, Option<u64>)]) -> String {
    if files.is_empty() {
        return "queued for filling".into();
    }
    let parts: Vec<String> = files
        .iter()
        .map(|(c, done, total)| match total {
            Some(t) => format!("{c} {}/{}", HumanBytes(*done), HumanBytes(*t)),
            None => format!("{c} {}", HumanBytes(*done)),
        })
        .collect();
    format!("filling {}", parts.join(", "))
}

/// Reports file progress into the catalog.
#[derive(Debug, Clone)]
pub struct CatalogProgress {
    catalog: Arc<Catalog>,
    key: (String, String, String),
}

struct FileSlot {
    catalog: Arc<Catalog>,
    key: (String, String, String),
    index: usize,
}

impl FileSlot {
    fn update(&self, f: impl FnOnce(&mut (String, u64, Option<u64>))) {
        let mut inner = self.catalog.lock();
        if let Some(FillState::Filling(files)) = inner.fills.get_mut(&self.key) {
            if let Some(slot) = files.get_mut(self.index) {
                f(slot);
            }
        }
    }
}

impl ProgressFactory for CatalogProgress {
    fn file(&self, component: &str, _file: &str, total: Option<u64>) -> Arc<dyn Progress> {
        let mut inner = self.catalog.lock();
        let entry = inner
            .fills
            .entry(self.key.clone())
            .or_insert_with(|| FillState::Filling(Vec::new()));
        if !matches!(entry, FillState::Filling(_)) {
            *entry = FillState::Filling(Vec::new());
        }
        let index = match entry {
            FillState::Filling(files) => {
                files.push((component.to_string(), 0, total));
                files.len() - 1
            }
            _ => 0,
        };
        Arc::new(FileSlot {
            catalog: self.catalog.clone(),
            key: self.key.clone(),
            index,
        })
    }
}

impl Progress for FileSlot {
    fn set_total(&self, total: u64) {
        self.update(|s| s.2 = Some(total));
    }
    fn advance(&self, n: u64) {
        self.update(|s| s.1 += n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_reads_like_a_sentence() {
        let s = describe_progress(&[("encoder".into(), 3 << 29, Some(6 << 30)), ("decoder".into(), 0, None)]);
        assert_eq!(s, "filling encoder 1.5 GiB/6.0 GiB, decoder 0 B");
        assert_eq!(describe_progress(&[]), "queued for filling");
    }

    #[test]
    fn file_progress_lands_in_the_state() {
        let c = Arc::new(Catalog::default());
        c.set_state("ns", "m", "g", FillState::Filling(Vec::new()));
        let p = c.progress("ns", "m", "g");
        let f = p.file("enc", "enc.safetensors", None);
        f.set_total(10);
        f.advance(4);
        assert_eq!(
            c.state("ns", "m", "g"),
            FillState::Filling(vec![("enc".into(), 4, Some(10))])
        );
    }
}
