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
    /// Streaming.
    Filling(FillProgress),
    /// Published.
    Ready,
    /// Failed; tried again at `retry_at` unless the spec changes first.
    Failed(Failure),
}

/// How far a fill has come.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FillProgress {
    /// Files the fill stages; 0 until it has planned them.
    pub files_total: usize,
    /// Bytes of all of them, when every size is known up front.
    pub bytes_total: Option<u64>,
    /// The files started so far, in the order they started.
    pub files: Vec<FileProgress>,
}

/// One file of a fill.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileProgress {
    /// Its path in the generation (`encoder.safetensors`, `llm/config.json`).
    pub file: String,
    /// Bytes written so far.
    pub done: u64,
    /// Its size, when known.
    pub total: Option<u64>,
}

impl FileProgress {
    /// Every byte of a known size written.
    pub fn complete(&self) -> bool {
        self.total.is_some_and(|t| self.done >= t)
    }
}

impl FillProgress {
    /// Bytes written so far, all files.
    pub fn bytes_done(&self) -> u64 {
        self.files.iter().map(|f| f.done).sum()
    }

    /// The planned total, else the sum of the sizes known so far.
    pub fn bytes_expected(&self) -> u64 {
        self.bytes_total
            .unwrap_or_else(|| self.files.iter().filter_map(|f| f.total).sum())
    }

    /// Files whose every byte is written.
    pub fn files_done(&self) -> usize {
        self.files.iter().filter(|f| f.complete()).count()
    }

    /// The files being written now, in start order.
    pub fn in_flight(&self) -> impl Iterator<Item = &FileProgress> {
        self.files.iter().filter(|f| !f.complete())
    }
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
pub fn describe_progress(p: &FillProgress) -> String {
    if p.files.is_empty() {
        return "queued for filling".into();
    }
    let files = p.files_total.max(p.files.len());
    let bytes = match p.bytes_expected() {
        0 => HumanBytes(p.bytes_done()).to_string(),
        total => format!("{}/{}", HumanBytes(p.bytes_done()), HumanBytes(total)),
    };
    let now: Vec<&str> = p.in_flight().take(3).map(|f| f.file.as_str()).collect();
    let more = p.in_flight().count().saturating_sub(now.len());
    let now = match (now.is_empty(), more) {
        (true, _) => String::new(),
        (false, 0) => format!(" ({})", now.join(", ")),
        (false, n) => format!(" ({} and {n} more)", now.join(", ")),
    };
    format!("filling {bytes}, {}/{files} files done{now}", p.files_done())
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
    fn update(&self, f: impl FnOnce(&mut FileProgress)) {
        let mut inner = self.catalog.lock();
        if let Some(FillState::Filling(progress)) = inner.fills.get_mut(&self.key) {
            if let Some(slot) = progress.files.get_mut(self.index) {
                f(slot);
            }
        }
    }
}

impl CatalogProgress {
    /// This fill's progress, made `Filling` if it was in another state.
    fn with_progress<T>(&self, f: impl FnOnce(&mut FillProgress) -> T) -> T {
        let mut inner = self.catalog.lock();
        let entry = inner
            .fills
            .entry(self.key.clone())
            .or_insert_with(|| FillState::Filling(FillProgress::default()));
        if !matches!(entry, FillState::Filling(_)) {
            *entry = FillState::Filling(FillProgress::default());
        }
        match entry {
            FillState::Filling(progress) => f(progress),
            _ => f(&mut FillProgress::default()),
        }
    }
}

impl ProgressFactory for CatalogProgress {
    fn plan(&self, files: usize, bytes: Option<u64>) {
        self.with_progress(|p| {
            p.files_total = files;
            p.bytes_total = bytes;
        });
    }

    fn file(&self, _component: &str, file: &str, total: Option<u64>) -> Arc<dyn Progress> {
        let index = self.with_progress(|p| {
            p.files.push(FileProgress {
                file: file.to_string(),
                done: 0,
                total,
            });
            p.files.len() - 1
        });
        Arc::new(FileSlot {
            catalog: self.catalog.clone(),
            key: self.key.clone(),
            index,
        })
    }
}

impl Progress for FileSlot {
    fn set_total(&self, total: u64) {
        self.update(|s| s.total = Some(total));
    }
    fn advance(&self, n: u64) {
        self.update(|s| s.done += n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_reads_like_a_sentence() {
        let file = |file: &str, done: u64, total: Option<u64>| FileProgress {
            file: file.into(),
            done,
            total,
        };
        let p = FillProgress {
            files_total: 6,
            bytes_total: Some(6 << 30),
            files: vec![
                file("llm/config.json", 700, Some(700)),
                file("llm/model-00001-of-00004.safetensors", 3 << 29, Some(2 << 30)),
                file("llm/model-00002-of-00004.safetensors", 0, None),
            ],
        };
        assert_eq!(
            describe_progress(&p),
            "filling 1.5 GiB/6.0 GiB, 1/6 files done (llm/model-00001-of-00004.safetensors, llm/model-00002-of-00004.safetensors)"
        );
        let many = FillProgress {
            files: (0..5).map(|i| file(&format!("f{i}"), 1, Some(2))).collect(),
            ..FillProgress::default()
        };
        assert_eq!(
            describe_progress(&many),
            "filling 5 B/10 B, 0/5 files done (f0, f1, f2 and 2 more)"
        );
        assert_eq!(describe_progress(&FillProgress::default()), "queued for filling");
    }

    #[test]
    fn file_progress_lands_in_the_state() {
        let c = Arc::new(Catalog::default());
        c.set_state("ns", "m", "g", FillState::Filling(FillProgress::default()));
        let p = c.progress("ns", "m", "g");
        p.plan(2, None);
        let f = p.file("enc", "enc.safetensors", None);
        f.set_total(10);
        f.advance(4);
        assert_eq!(
            c.state("ns", "m", "g"),
            FillState::Filling(FillProgress {
                files_total: 2,
                bytes_total: None,
                files: vec![FileProgress {
                    file: "enc.safetensors".into(),
                    done: 4,
                    total: Some(10)
                }]
            })
        );
    }
}
