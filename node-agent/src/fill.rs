//! The fill engine: one ModelWrapper spec in, one verified generation
//! published atomically out, or an error and nothing visible.
//!
//! Order (docs/FORMAT.md): plan sizes and check capacity; stage every file
//! under `<root>/.staging/…` (its own tmpfs when mounts are allowed) while
//! hashing; verify digests and safetensors headers; write `manifest.json`
//! last; publish with one atomic step (bind mount, or rename).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read};

use sha2::Digest;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use futures_util::stream::{self, StreamExt, TryStreamExt};
use reqwest::header::HeaderValue;
use zerocopy_api::format::{
    generation_digest, skeleton_file, weights_file, FORMAT_V1, FORMAT_V2, MANIFEST_FILE, PIPELINE_SKELETON_FILE,
};
use zerocopy_api::manifest::{
    Manifest, ManifestComponent, ManifestDirectory, ManifestEntry, ManifestFile, ManifestSkeleton, ManifestWeights,
    SafetensorsSummary,
};
use zerocopy_api::safetensors::{check_header_len, header_len, validate_header, Header};
use zerocopy_api::source::{DirectorySource, Selection, MAX_FILES};
use zerocopy_api::{validate_sources, ModelWrapperSpec, Pinning};

use crate::error::{DigestKind, FillError};
use crate::layout::{RootLock, VolumeRoot};
use crate::mount;
use crate::peer::{self, NoPeers, PeerDirectory, PeerView};
use crate::secrets::{NoSecrets, SecretStore};
use crate::source::hf::RepoDigest;
use crate::source::http::HttpSource;
use crate::source::objects::StoreChecksum;
use crate::source::policy::SourcePolicy;
use crate::source::sink::HashingSink;
use crate::source::{self, FetchError, Progress};

/// Files fetched at once within one generation.
const PARALLEL_FILES: usize = 4;
/// Room for the manifest and filesystem overhead in a per-generation tmpfs.
const TMPFS_SLACK: u64 = 1 << 20;
/// tmpfs sizes are rounded to huge-page size so `huge=within_size` can use them.
const TMPFS_ROUND: u64 = 2 << 20;
/// Most bytes a skeleton file may have: a module saved on the meta device
/// holds no weights, so anything larger is a mistake or an attempt to copy
/// something else through the volume.
pub const MAX_SKELETON_BYTES: u64 = 64 << 20;
/// Most bytes a file of a directory component may have unless it is a
/// safetensors file: configs, tokenizers and vocabularies are far smaller,
/// and a larger one is a mistake (or weights in a format we do not map).
pub const MAX_AUX_BYTES: u64 = 128 << 20;

/// How a generation is backed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MountMode {
    /// A directory when the root is on a tmpfs (one filesystem per node, so
    /// a namespace catalog mount sees new generations at once), except
    /// wrappers asking for huge pages; an own tmpfs per generation when the
    /// root is on disk and this process may mount; else a directory.
    Auto,
    /// Own tmpfs per generation (needs CAP_SYS_ADMIN); fails otherwise.
    Tmpfs,
    /// A directory under the root, which should itself be on a tmpfs.
    Directory,
}

/// Creates one progress reporter per file being filled.
pub trait ProgressFactory: Send + Sync {
    /// The fill will stage `files` files, `bytes` in all when every size is known.
    fn plan(&self, _files: usize, _bytes: Option<u64>) {}
    /// A reporter for `file` (its path in the generation) of `component`;
    /// `total` when the size is known.
    fn file(&self, component: &str, file: &str, total: Option<u64>) -> Arc<dyn Progress>;
}

/// No progress output.
#[derive(Debug, Default)]
pub struct Quiet;

impl ProgressFactory for Quiet {
    fn file(&self, _: &str, _: &str, _: Option<u64>) -> Arc<dyn Progress> {
        Arc::new(source::NoProgress)
    }
}

/// What a fill did.
#[derive(Debug, Clone)]
pub enum FillOutcome {
    /// The generation was already complete; nothing was read.
    UpToDate(Manifest),
    /// A new generation was published.
    Filled {
        /// Its manifest.
        manifest: Manifest,
        /// Wall time of the fill.
        seconds: f64,
    },
}

impl FillOutcome {
    /// The generation's manifest either way.
    pub fn manifest(&self) -> &Manifest {
        match self {
            FillOutcome::UpToDate(m) | FillOutcome::Filled { manifest: m, .. } => m,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileKind {
    Weights,
    Skeleton,
    PipelineSkeleton,
    /// A file of a directory component (`<component>/<path>`).
    Entry,
}

#[derive(Debug, Clone)]
struct PlannedFile {
    component: String,
    file_name: String,
    uri: url::Url,
    sha256: Option<String>,
    size: Option<u64>,
    kind: FileKind,
    origin: Origin,
    /// The git blob id a hub listing gives for a file kept in git (not LFS).
    git_blob: Option<String>,
    /// `Authorization` for the origin (a hub token from a shared Secret).
    auth: Option<HeaderValue>,
    /// An object of an `s3://` or `az://` source: the store and the key.
    object: Option<StoreObject>,
    /// Concurrent ranges to fetch it with (1: one stream).
    ranges: u64,
    /// Size the staging file up front (its filesystem gives huge pages,
    /// which `huge=within_size` allocates only inside the file's size).
    presize: bool,
}

/// One object of a bucket or container.
#[derive(Debug, Clone)]
struct StoreObject {
    store: Arc<dyn object_store::ObjectStore>,
    /// `s3://bucket` or `az://account/container`, for messages.
    place: String,
    key: String,
    /// An `s3://` bucket's reader of `ChecksumSHA256`.
    checksums: Option<source::objects::S3Checksums>,
    /// The object's own full-object sha256 (S3 `ChecksumSHA256`), lowercase
    /// hex: the staged bytes must hash to it.
    store_sha256: Option<String>,
    /// The ETag of the version `store_sha256` belongs to (`If-Match`).
    etag: Option<String>,
}

/// Why listing a store prefix gave nothing to fill.
enum StoreListing {
    /// Nothing below the prefix.
    Empty(String),
    /// The store could not be listed.
    Failed(FetchError),
}

/// Every object below `prefix` of `store`, as listed files.
async fn list_store(
    store: Arc<dyn object_store::ObjectStore>,
    checksums: Option<source::objects::S3Checksums>,
    place: &str,
    prefix: &str,
) -> Result<Vec<Listed>, StoreListing> {
    let objects = source::objects::list(store.as_ref(), place, prefix, 4 * MAX_FILES)
        .await
        .map_err(StoreListing::Failed)?;
    if objects.is_empty() {
        return Err(StoreListing::Empty(format!(
            "no object below {place}/{prefix}: check the bucket or container, the prefix and the endpoint"
        )));
    }
    let mut out = Vec::new();
    for (rel, size) in objects {
        let key = format!("{prefix}{rel}");
        let uri = url::Url::parse(&format!("{place}/{key}"))
            .map_err(|e| StoreListing::Failed(FetchError::Unreachable(format!("{place}/{key}: {e}"))))?;
        out.push(Listed {
            path: rel,
            size: Some(size),
            uri,
            sha256: None,
            git_blob: None,
            object: Some(StoreObject {
                store: store.clone(),
                place: place.to_string(),
                key,
                checksums: checksums.clone(),
                store_sha256: None,
                etag: None,
            }),
        });
    }
    Ok(out)
}

impl PlannedFile {
    fn new(component: &str, file_name: String, uri: url::Url, sha256: Option<String>, kind: FileKind) -> Self {
        Self {
            component: component.to_string(),
            file_name,
            uri,
            sha256,
            size: None,
            kind,
            origin: Origin::Source,
            git_blob: None,
            auth: None,
            object: None,
            ranges: 1,
            presize: false,
        }
    }

    fn is_safetensors(&self) -> bool {
        self.kind == FileKind::Weights || (self.kind == FileKind::Entry && self.file_name.ends_with(".safetensors"))
    }
}

/// Endings of files that hold no weights, so a source without safetensors
/// names only its weight files (the ones left out) in the error.
const DEFAULT_WEIGHTLESS: [&str; 6] = [".json", ".txt", ".md", ".model", ".py", ".jinja"];

/// What a directory source lists: one file, before it is planned.
struct Listed {
    path: String,
    size: Option<u64>,
    uri: url::Url,
    sha256: Option<String>,
    git_blob: Option<String>,
    object: Option<StoreObject>,
}

/// `sha256sum` output beside the files (`<hex>  <path>` per line): pins for
/// sources whose files carry no digests of their own (S3, a directory).
pub const SUMS_FILE: &str = "SHA256SUMS";

/// One attempt's source when it is not the spec's URI.
#[derive(Debug, Clone)]
enum Fetch {
    Upload(PathBuf),
    Peer(url::Url),
}

/// Where a planned file's bytes come from on this attempt.
#[derive(Debug, Clone, Default)]
enum Origin {
    /// The spec's URI.
    #[default]
    Source,
    /// A verified upload on this node.
    Upload(PathBuf),
    /// Other agents holding it, in order: `(node, blob URL)`.
    Peers(Vec<(String, url::Url)>),
}

struct StagedFile {
    plan: PlannedFile,
    bytes: u64,
    sha256: String,
    header: Option<Header>,
}

/// Fills generations under one volume root.
pub struct FillEngine {
    root: VolumeRoot,
    capacity: Option<u64>,
    mode: MountMode,
    can_mount: bool,
    root_on_tmpfs: bool,
    /// The root's tmpfs is mounted to allocate huge pages (the agent's own
    /// root tmpfs, `crate::root_tmpfs`).
    root_huge: bool,
    /// What the huge-page probe found (None: mounts are not used); probed
    /// on first need, not at every start of a one-shot `standalone` run.
    huge_pages: std::sync::OnceLock<Option<crate::hugepages::HugePages>>,
    policy: Arc<SourcePolicy>,
    http: HttpSource,
    peers: Arc<dyn PeerDirectory>,
    /// Client for other agents (carries the peer token); `None`: no peer fill.
    peer_http: Option<HttpSource>,
    /// Where `hf://` sources go unless the spec names an endpoint.
    hf_endpoint: url::Url,
    /// Credentials for sources that name a Secret.
    secrets: Arc<dyn SecretStore>,
    /// Bytes reserved by fills in progress, by `namespace/name@generation`:
    /// concurrent fills must not each see the same free room.
    reserved: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
    _lock: RootLock,
}

/// Sets its flag when dropped: a stopped fill's future drops it, and the
/// blocking copy checks the flag between chunks.
#[derive(Default)]
struct CancelOnDrop(Arc<std::sync::atomic::AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Releases a fill's reservation when the fill ends, however it ends.
struct Reservation<'a> {
    engine: &'a FillEngine,
    key: String,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.engine.reservations().remove(&self.key);
    }
}

impl FillEngine {
    /// Prepares the root (creating it, or checking that only this user can
    /// write it), takes it for this process alone, and decides how
    /// generations are backed; every source is read as `policy` allows.
    pub fn new(root: VolumeRoot, capacity: Option<u64>, mode: MountMode, policy: SourcePolicy) -> io::Result<Self> {
        root.prepare().map_err(io::Error::other)?;
        let lock = root
            .lock(&format!("zerocopy-node-agent {}", env!("CARGO_PKG_VERSION")))
            .map_err(io::Error::other)?;
        fs::create_dir_all(root.staging_dir())?;
        let can_mount = mode != MountMode::Directory && can_mount(&root.staging_dir());
        let root_on_tmpfs = mount::is_on_tmpfs(root.path()).unwrap_or(false);
        let root_huge = root_on_tmpfs && crate::root_tmpfs::gives_huge_pages(root.path());
        let use_tmpfs = match mode {
            MountMode::Directory => false,
            MountMode::Tmpfs => true,
            MountMode::Auto => can_mount && !root_on_tmpfs,
        };
        if !use_tmpfs && !root_on_tmpfs {
            tracing::warn!(root = %root.path().display(), "volume root is not on a tmpfs and mounts are not used: weights will live in the page cache of a disk, not in shared memory");
        }
        let policy = Arc::new(policy);
        let http = HttpSource::new(policy.clone()).map_err(io::Error::other)?;
        Ok(Self {
            root,
            capacity,
            mode,
            can_mount,
            huge_pages: std::sync::OnceLock::new(),
            root_on_tmpfs,
            root_huge,
            policy,
            http,
            peers: Arc::new(NoPeers),
            peer_http: None,
            hf_endpoint: url::Url::parse(source::hf::DEFAULT_ENDPOINT).map_err(io::Error::other)?,
            secrets: Arc::new(NoSecrets),
            reserved: Default::default(),
            _lock: lock,
        })
    }

    fn reservations(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<String, u64>> {
        self.reserved.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// "ml/a@0123… (4.0 GiB), ml/b@4567… (1.0 GiB, filling)": who holds the room.
    fn holders(&self) -> String {
        let mut parts: Vec<String> = self
            .root
            .generations()
            .unwrap_or_default()
            .iter()
            .filter_map(|g| {
                let m = g.manifest.as_ref()?;
                Some(format!(
                    "{}/{}@{} ({})",
                    g.namespace,
                    g.name,
                    g.generation,
                    zerocopy_api::quantity::HumanBytes(m.total_bytes)
                ))
            })
            .collect();
        parts.extend(
            self.reservations()
                .iter()
                .map(|(k, b)| format!("{k} ({}, filling)", zerocopy_api::quantity::HumanBytes(*b))),
        );
        if parts.is_empty() {
            "nothing".into()
        } else {
            parts.join(", ")
        }
    }

    /// Fills from other agents first (`peers` says who holds what), with
    /// `token` to authenticate to them; every byte is still verified against
    /// the spec's sha256, and a peer that fails or lies is skipped.
    pub fn with_peers(mut self, peers: Arc<dyn PeerDirectory>, token: &str) -> io::Result<Self> {
        self.peers = peers;
        self.peer_http = Some(HttpSource::for_peers(token).map_err(io::Error::other)?);
        Ok(self)
    }

    /// Sends `hf://` sources without an endpoint of their own to `endpoint`
    /// (a mirror or an on-premises hub).
    pub fn with_hf_endpoint(mut self, endpoint: url::Url) -> Self {
        self.hf_endpoint = endpoint;
        self
    }

    /// Reads source credentials (`secretRef`) from `secrets`.
    pub fn with_secrets(mut self, secrets: Arc<dyn SecretStore>) -> Self {
        self.secrets = secrets;
        self
    }

    /// Where each file comes from on this attempt: an upload on this node,
    /// else peers that hold it, else the origin, unless the origin is an
    /// upload not here yet or a node ordered earlier fetches it first.
    fn choose_origin(
        &self,
        namespace: &str,
        wrapper: &str,
        f: &PlannedFile,
        view: &PeerView,
    ) -> Result<Origin, FillError> {
        if let Some(sha) = &f.sha256 {
            let sha = sha.to_ascii_lowercase();
            let upload = peer::upload_path(&self.root, namespace, &sha);
            if upload.is_file() {
                return Ok(Origin::Upload(upload));
            }
            if self.peer_http.is_some() && !view.ready.is_empty() {
                let urls = view
                    .ready
                    .iter()
                    .filter_map(|(node, ep)| peer::blob_url(ep, &sha).ok().map(|u| (node.clone(), u)))
                    .collect();
                return Ok(Origin::Peers(urls));
            }
        }
        let waiting = |reason: String| FillError::WaitingForSource {
            wrapper: wrapper.into(),
            component: f.component.clone(),
            reason,
        };
        if f.uri.scheme() == "upload" {
            return Err(waiting(
                "waiting for ModelWrapper.from_model() to upload it, or for another node to hold it".into(),
            ));
        }
        if self.peer_http.is_some() && view.catching_up {
            return Err(waiting(
                "waiting for the list of peers to show this node's replica (it may not show earlier nodes yet)".into(),
            ));
        }
        if self.peer_http.is_some() && !view.earlier_fillers.is_empty() {
            return Err(waiting(format!(
                "node {} fetches it from the origin first; this node copies it from there once Ready",
                view.earlier_fillers.join(", ")
            )));
        }
        Ok(Origin::Source)
    }

    /// The root this engine fills.
    pub fn root(&self) -> &VolumeRoot {
        &self.root
    }

    /// True when generations (not asking for huge pages) get their own
    /// tmpfs mount.
    pub fn uses_tmpfs(&self) -> bool {
        self.backing(false, None).own_tmpfs
    }

    /// True when generations filled into the root get huge pages from its
    /// mount (the agent's own `huge=within_size` root tmpfs).
    pub fn root_gives_huge_pages(&self) -> bool {
        self.root_huge
    }

    /// Whether a tmpfs this agent mounts gets huge pages (None: it mounts
    /// none). Probed once, on the first call, and logged.
    pub fn huge_pages(&self) -> Option<&crate::hugepages::HugePages> {
        self.huge_pages
            .get_or_init(|| {
                let found = self.can_mount.then(|| crate::hugepages::probe(&self.root.staging_dir()))?;
                if found.granted {
                    tracing::info!(detail = %found.detail, "tmpfs huge pages: granted by this kernel");
                } else {
                    tracing::info!(
                        detail = %found.detail,
                        "tmpfs huge pages: not granted by this kernel; wrappers with memory.hugePages: true fill with 4 KiB pages"
                    );
                }
                Some(found)
            })
            .as_ref()
    }

    fn backing(&self, huge_pages_requested: bool, bytes: Option<u64>) -> Backing {
        choose_backing(
            self.mode,
            self.can_mount,
            self.root_on_tmpfs,
            self.root_huge,
            huge_pages_requested,
            bytes,
        )
    }

    /// Ensures the generation for `spec` is complete, filling it if needed.
    pub async fn fill(
        &self,
        namespace: &str,
        name: &str,
        spec: &ModelWrapperSpec,
        progress: &dyn ProgressFactory,
    ) -> Result<FillOutcome, FillError> {
        let pinning = if self.policy.require_sha256 {
            Pinning::Required
        } else {
            Pinning::Optional
        };
        validate_sources(namespace, name, spec, pinning)?;
        let wrapper = format!("{namespace}/{name}");
        let generation = generation_digest(spec);
        if let Some(m) = self.root.read_manifest(namespace, name, &generation) {
            // A fill killed between publishing and pointing `current` left
            // the generation complete but not current.
            self.root
                .set_current(namespace, name, &generation)
                .map_err(|source| FillError::Io {
                    wrapper: wrapper.clone(),
                    action: "pointing `current` at",
                    path: self.root.generation_dir(namespace, name, &generation),
                    source,
                })?;
            return Ok(FillOutcome::UpToDate(m));
        }
        let started = Instant::now();
        let io_err = |action: &'static str, path: &Path| {
            let wrapper = wrapper.clone();
            let path = path.to_path_buf();
            move |source: io::Error| FillError::Io {
                wrapper,
                action,
                path,
                source,
            }
        };

        let mut plan = plan_files(spec);
        let (listed, revisions) = self.expand_sources(namespace, &wrapper, spec).await?;
        plan.extend(listed);
        let view = self.peers.view(namespace, name, &generation);
        for f in &mut plan {
            f.origin = self.choose_origin(namespace, &wrapper, f, &view)?;
            if f.size.is_none() || !matches!(f.origin, Origin::Source) {
                f.size = self.size_of(f).await.map_err(|e| fetch_error(&wrapper, f, e))?;
            }
        }
        let needed: u64 = plan.iter().filter_map(|f| f.size).fold(0, u64::saturating_add);
        // Keep about PARALLEL_FILES streams busy: large HTTP objects get the
        // connections that fewer files than that would leave idle (one
        // connection's throughput often caps a CDN download). Several large
        // files already fill them: measured on loopback, splitting each of
        // four shards into four ranges was 30 % slower than one stream each.
        let large = |f: &PlannedFile| {
            f.size.is_some_and(|n| n >= source::http::RANGED_MIN)
                && f.object.is_none()
                && matches!(f.origin, Origin::Source)
                && matches!(f.uri.scheme(), "http" | "https")
        };
        let large_files = plan.iter().filter(|f| large(f)).count() as u64;
        if let Some(ranges) = (PARALLEL_FILES as u64).checked_div(large_files) {
            for f in plan.iter_mut().filter(|f| large(f)) {
                f.ranges = ranges.max(1);
            }
        }
        let key = format!("{wrapper}@{generation}");
        let (used, limit, _reservation) = {
            // Read under the lock: a fill that publishes and drops its
            // reservation in between would otherwise be counted nowhere.
            let mut reserved = self.reservations();
            let stored = self.root.used_bytes().map_err(io_err("reading", self.root.path()))?;
            let used = stored.saturating_add(reserved.values().sum());
            let limit = match self.capacity {
                Some(capacity) if used.saturating_add(needed) > capacity => {
                    drop(reserved);
                    return Err(FillError::Capacity {
                        wrapper,
                        needed,
                        capacity,
                        used,
                        held_by: self.holders(),
                    });
                }
                Some(capacity) => capacity - used,
                None => u64::MAX,
            };
            // A file of unknown size (HEAD refused) may take all the room
            // left: reserve it, so a concurrent fill cannot count on it too.
            let all_known = plan.iter().all(|f| f.size.is_some());
            let reserve = if all_known || self.capacity.is_none() {
                needed
            } else {
                limit
            };
            reserved.insert(key.clone(), reserve);
            (used, limit, Reservation { engine: self, key })
        };

        let staging = self.root.staging_dir().join(format!("{namespace}.{name}.{generation}"));
        let mut guard = StagingGuard::create(&staging).map_err(io_err("creating staging", &staging))?;
        let known_bytes = plan.iter().map(|f| f.size).sum::<Option<u64>>();
        let backing = self.backing(spec.memory.huge_pages, known_bytes);
        let own_tmpfs = backing.own_tmpfs;
        if spec.memory.huge_pages {
            match (backing.huge_pages, self.huge_pages()) {
                (true, Some(h)) if !h.granted => tracing::warn!(
                    wrapper = %wrapper,
                    detail = %h.detail,
                    "memory.hugePages is set, but this node's kernel grants tmpfs no huge pages: filling with 4 KiB pages (first touch and prefault cost ~10x more per GiB)"
                ),
                (false, _) | (true, None) => {
                    tracing::warn!(wrapper = %wrapper, "memory.hugePages is set, but this agent neither mounts tmpfs (--mount-mode directory, or not root) nor has a huge-page root tmpfs: 4 KiB pages")
                }
                (true, Some(_)) => {}
            }
        }
        if own_tmpfs {
            let all_known = plan.iter().all(|f| f.size.is_some());
            let size = if all_known { needed } else { limit.min(host_memory()) };
            let size = size
                .saturating_add(TMPFS_SLACK)
                .div_ceil(TMPFS_ROUND)
                .saturating_mul(TMPFS_ROUND);
            mount::mount_tmpfs(&staging, size, backing.huge_pages).map_err(io_err("mounting tmpfs at", &staging))?;
            guard.mounted = true;
        }

        progress.plan(plan.len(), plan.iter().map(|f| f.size).sum::<Option<u64>>());
        let staged: Vec<StagedFile> = stream::iter(
            plan.into_iter()
                .map(|f| PlannedFile {
                    presize: backing.huge_pages,
                    ..f
                })
                .map(|f| self.stage(&wrapper, &staging, f, limit, progress)),
        )
        .buffer_unordered(PARALLEL_FILES)
        .try_collect()
        .await?;
        let total_bytes: u64 = staged.iter().map(|s| s.bytes).sum();
        if self.capacity.is_some() && total_bytes > limit {
            return Err(FillError::Capacity {
                wrapper,
                needed: total_bytes,
                capacity: self.capacity.unwrap_or(0),
                used,
                held_by: self.holders(),
            });
        }

        let weights = weights_of_directories(&wrapper, spec, &staging, &staged)?;
        let mut manifest = build_manifest(
            namespace,
            name,
            &generation,
            spec,
            staged,
            total_bytes,
            &revisions,
            weights,
        );
        manifest.huge_pages = backing.huge_pages;
        let manifest_json = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| io_err("encoding manifest", &staging)(io::Error::other(e)))?;
        let manifest_path = staging.join(MANIFEST_FILE);
        fs::write(&manifest_path, manifest_json).map_err(io_err("writing", &manifest_path))?;

        let target = self.root.generation_dir(namespace, name, &generation);
        failpoint("fill:before-publish");
        self.publish(&staging, &target, own_tmpfs)
            .map_err(io_err("publishing", &target))?;
        guard.disarm();
        failpoint("fill:before-current");
        self.root
            .set_current(namespace, name, &generation)
            .map_err(io_err("pointing `current` at", &target))?;
        let seconds = started.elapsed().as_secs_f64();
        tracing::info!(wrapper = %wrapper, %generation, bytes = total_bytes, seconds, tmpfs = own_tmpfs, "generation published");
        Ok(FillOutcome::Filled { manifest, seconds })
    }

    async fn size_of(&self, f: &PlannedFile) -> Result<Option<u64>, FetchError> {
        match &f.origin {
            Origin::Upload(path) => return Ok(fs::metadata(path).ok().map(|m| m.len())),
            Origin::Peers(urls) => {
                if let (Some(http), Some((_, url))) = (&self.peer_http, urls.first()) {
                    return Ok(source::http::size(http, url, None).await.ok().flatten());
                }
                return Ok(None);
            }
            Origin::Source => {}
        }
        match f.uri.scheme() {
            "file" => source::file::open(&f.uri, &self.policy).map(|(_, size)| Some(size)),
            _ => source::http::size(&self.http, &f.uri, f.auth.as_ref()).await,
        }
    }

    /// Lists every directory source (`hf://`, `file:///dir/`) into planned
    /// files `<component>/<path>`, with the digests the source provides and
    /// the spec's pins, and refuses what the format cannot take, naming the
    /// component and the file. Also returns each `hf://` component's commit.
    async fn expand_sources(
        &self,
        namespace: &str,
        wrapper: &str,
        spec: &ModelWrapperSpec,
    ) -> Result<(Vec<PlannedFile>, BTreeMap<String, String>), FillError> {
        let mut planned = Vec::new();
        let mut revisions = BTreeMap::new();
        for c in &spec.pipeline.components {
            let Some(src) = &c.source else { continue };
            let bad = |reason: String| FillError::BadContent {
                wrapper: wrapper.into(),
                component: c.name.clone(),
                uri: src.uri.clone(),
                reason,
            };
            let unreachable = |e: FetchError| source_error(wrapper, &c.name, &src.uri, e);
            let listing_error = |e: StoreListing| match e {
                StoreListing::Empty(reason) => bad(reason),
                StoreListing::Failed(e) => unreachable(e),
            };
            let selection = Selection::new(&src.include, &src.exclude).map_err(bad)?;
            let mut auth = None;
            let mut listed: Vec<Listed> = match DirectorySource::parse(&src.uri).map_err(bad)? {
                DirectorySource::HuggingFace { repo, revision } => {
                    auth = self.auth_for(namespace, wrapper, &c.name, src).await?;
                    let endpoint = match &src.endpoint {
                        Some(e) => url::Url::parse(e).map_err(|e| bad(format!("endpoint: {e}")))?,
                        None => self.hf_endpoint.clone(),
                    };
                    let revision = revision.unwrap_or_else(|| "main".into());
                    let listing = source::hf::list(&self.http, &endpoint, &repo, &revision, auth.as_ref())
                        .await
                        .map_err(unreachable)?;
                    if zerocopy_api::source::is_commit(&revision) && listing.commit != revision {
                        return Err(bad(format!(
                            "the hub answered commit {} for the pinned commit {revision}; refusing a server that does not serve the commit asked for",
                            listing.commit
                        )));
                    }
                    tracing::info!(wrapper, component = %c.name, %repo, %revision, commit = %listing.commit, files = listing.files.len(), "hub revision resolved");
                    revisions.insert(c.name.clone(), listing.commit.clone());
                    let mut out = Vec::new();
                    for f in listing.files {
                        let uri =
                            source::hf::resolve_url(&endpoint, &repo, &listing.commit, &f.path).map_err(unreachable)?;
                        let (sha256, git_blob) = match f.digest {
                            RepoDigest::Sha256(s) => (Some(s), None),
                            RepoDigest::GitBlob(b) => (None, Some(b)),
                            RepoDigest::None => (None, None),
                        };
                        out.push(Listed {
                            path: f.path,
                            size: f.size,
                            uri,
                            sha256,
                            git_blob,
                            object: None,
                        });
                    }
                    out
                }
                DirectorySource::S3 { bucket, prefix } => {
                    let credentials = self.credentials(namespace, wrapper, &c.name, src).await?;
                    let s3 = source::objects::bucket(
                        &self.http,
                        &bucket,
                        src.endpoint.as_deref(),
                        src.region.as_deref(),
                        credentials.as_ref(),
                    )
                    .map_err(unreachable)?;
                    list_store(s3.store, Some(s3.checksums), &format!("s3://{bucket}"), &prefix)
                        .await
                        .map_err(listing_error)?
                }
                DirectorySource::Gcs { bucket, prefix } => {
                    let credentials = self.credentials(namespace, wrapper, &c.name, src).await?;
                    let endpoint = source::gcs::endpoint(src.endpoint.as_deref()).map_err(unreachable)?;
                    auth = source::gcs::authorization(&self.http, &endpoint, &bucket, credentials.as_ref())
                        .await
                        .map_err(unreachable)?;
                    let objects =
                        source::gcs::list(&self.http, &endpoint, &bucket, &prefix, auth.as_ref(), 4 * MAX_FILES)
                            .await
                            .map_err(unreachable)?;
                    let mut out = Vec::new();
                    for o in objects {
                        // Folder placeholders (`a/`) hold no file.
                        let Some(rel) = o
                            .name
                            .strip_prefix(&prefix)
                            .filter(|r| !r.is_empty() && !r.ends_with('/'))
                        else {
                            continue;
                        };
                        out.push(Listed {
                            path: rel.to_string(),
                            size: Some(o.size),
                            uri: source::gcs::media_url(&endpoint, &bucket, &o.name).map_err(unreachable)?,
                            sha256: None,
                            git_blob: None,
                            object: None,
                        });
                    }
                    if out.is_empty() {
                        return Err(bad(format!(
                            "no object below gs://{bucket}/{prefix}: check the bucket, the prefix and the endpoint"
                        )));
                    }
                    out
                }
                DirectorySource::Azure {
                    account,
                    container,
                    prefix,
                } => {
                    let credentials = self.credentials(namespace, wrapper, &c.name, src).await?;
                    let store = source::objects::container(
                        &self.http,
                        &account,
                        &container,
                        src.endpoint.as_deref(),
                        credentials.as_ref(),
                    )
                    .map_err(unreachable)?;
                    list_store(store, None, &format!("az://{account}/{container}"), &prefix)
                        .await
                        .map_err(listing_error)?
                }
                DirectorySource::Oci {
                    registry,
                    repository,
                    reference,
                } => {
                    let credentials = self.credentials(namespace, wrapper, &c.name, src).await?;
                    let base = source::oci::base_url(&registry, src.endpoint.as_deref()).map_err(unreachable)?;
                    let artifact = source::oci::resolve(
                        &self.http,
                        &base,
                        &registry,
                        &repository,
                        &reference,
                        credentials.as_ref(),
                    )
                    .await
                    .map_err(unreachable)?;
                    tracing::info!(wrapper, component = %c.name, %registry, %repository, %reference, digest = %artifact.digest, files = artifact.files.len(), "OCI artifact resolved");
                    revisions.insert(c.name.clone(), artifact.digest.clone());
                    auth = artifact.auth.clone();
                    let mut seen = std::collections::BTreeSet::new();
                    let mut out = Vec::new();
                    for f in artifact.files {
                        if !seen.insert(f.path.clone()) {
                            return Err(bad(format!("two layers name the file {}", f.path)));
                        }
                        out.push(Listed {
                            path: f.path,
                            size: Some(f.size),
                            uri: f.url,
                            sha256: Some(f.sha256),
                            git_blob: None,
                            object: None,
                        });
                    }
                    out
                }
                DirectorySource::Directory { path } => {
                    let path = url::Url::parse(&src.uri)
                        .ok()
                        .and_then(|u| u.to_file_path().ok())
                        .unwrap_or_else(|| PathBuf::from(&path));
                    let policy = self.policy.clone();
                    tokio::task::spawn_blocking(move || list_directory(&policy, &path))
                        .await
                        .map_err(|e| unreachable(FetchError::Write(io::Error::other(e))))?
                        .map_err(unreachable)?
                }
            };
            let source_weights: Vec<String> = listed
                .iter()
                .filter(|l| l.path.ends_with(".safetensors") || !DEFAULT_WEIGHTLESS.iter().any(|s| l.path.ends_with(s)))
                .filter(|l| !selection.takes(&l.path) && zerocopy_api::source::is_safe_relative_path(&l.path))
                .map(|l| l.path.clone())
                .take(8)
                .collect();
            listed.retain(|l| selection.takes(&l.path));
            listed.sort_by(|a, b| a.path.cmp(&b.path));
            if let Some(w) = listed.windows(2).find(|w| w[0].path == w[1].path) {
                return Err(bad(format!("the source lists {} twice", w[0].path)));
            }
            for (path, pin) in &src.sha256 {
                match listed.iter_mut().find(|l| &l.path == path) {
                    Some(l) => match &l.sha256 {
                        Some(listed_sha) if !listed_sha.eq_ignore_ascii_case(pin) => {
                            return Err(bad(format!(
                                "{path}: the spec pins sha256 {pin} but the source lists {listed_sha}; fix the pin or the revision"
                            )))
                        }
                        _ => l.sha256 = Some(pin.to_ascii_lowercase()),
                    },
                    None => {
                        return Err(bad(format!(
                            "source.sha256 pins {path}, which the source does not hold or include/exclude leave out"
                        )))
                    }
                }
            }
            if let Some(index) = listed.iter().position(|l| l.path == SUMS_FILE) {
                let sums = &listed[index];
                if self.policy.require_sha256 && sums.sha256.is_none() {
                    return Err(bad(format!(
                        "{SUMS_FILE} is not pinned: in a cluster its lines count only when the spec pins it (source.sha256: {{{SUMS_FILE}: <sha256>}})"
                    )));
                }
                let text = self.read_small(sums, auth.as_ref()).await.map_err(unreachable)?;
                let actual = hex::encode(sha2::Sha256::digest(&text));
                if let Some(pin) = &sums.sha256 {
                    if !pin.eq_ignore_ascii_case(&actual) {
                        return Err(FillError::DigestMismatch {
                            wrapper: wrapper.into(),
                            what: DigestKind::Sha256,
                            component: c.name.clone(),
                            uri: sums.uri.to_string(),
                            expected: pin.clone(),
                            actual,
                        });
                    }
                }
                // The staged copy must be the one read here.
                listed[index].sha256 = Some(actual);
                let sums = parse_sums(&text).map_err(|e| bad(format!("{SUMS_FILE}: {e}")))?;
                for l in &mut listed {
                    if l.path == SUMS_FILE {
                        continue;
                    }
                    let Some(listed_sum) = sums.get(&l.path) else { continue };
                    match &l.sha256 {
                        Some(pin) if !pin.eq_ignore_ascii_case(listed_sum) => {
                            return Err(bad(format!(
                                "{}: {SUMS_FILE} lists sha256 {listed_sum} but the spec pins {pin}",
                                l.path
                            )))
                        }
                        _ => l.sha256 = Some(listed_sum.clone()),
                    }
                }
            }
            if !self.policy.require_sha256 {
                store_checksums(wrapper, &c.name, &mut listed)
                    .await
                    .map_err(unreachable)?;
            }
            let names = || {
                let mut shown: Vec<&str> = listed.iter().take(8).map(|l| l.path.as_str()).collect();
                if listed.len() > 8 {
                    shown.push("…");
                }
                shown.join(", ")
            };
            if listed.is_empty() {
                return Err(bad(
                    "no file of the source is selected (empty, or include/exclude leave nothing)".into(),
                ));
            }
            if listed.len() > MAX_FILES {
                return Err(bad(format!(
                    "{} files are selected; at most {MAX_FILES}: narrow include/exclude",
                    listed.len()
                )));
            }
            if !listed.iter().any(|l| l.path.ends_with(".safetensors")) {
                let left_out = if source_weights.is_empty() {
                    String::new()
                } else {
                    format!("; left out: {}", source_weights.join(", "))
                };
                return Err(bad(format!(
                    "no .safetensors file among the selected files ({}){left_out}: volumes map safetensors weights only; pick a revision that has them (on the Hub, the \"convert to safetensors\" bot opens one) or convert the checkpoint",
                    names()
                )));
            }
            for l in &listed {
                if !l.path.ends_with(".safetensors") && l.size.is_some_and(|n| n > MAX_AUX_BYTES) {
                    return Err(bad(format!(
                        "{} is {}; files other than .safetensors may hold at most {} (configs and tokenizers are far smaller): leave it out with source.exclude",
                        l.path,
                        zerocopy_api::quantity::HumanBytes(l.size.unwrap_or_default()),
                        zerocopy_api::quantity::HumanBytes(MAX_AUX_BYTES)
                    )));
                }
                if self.policy.require_sha256 && l.sha256.is_none() && l.git_blob.is_none() {
                    let store_note = if l.object.as_ref().is_some_and(|o| o.checksums.is_some()) {
                        "; S3's own ChecksumSHA256 does not count: it comes from the bucket, which may change between nodes"
                    } else {
                        ""
                    };
                    return Err(bad(format!(
                        "{} has no digest from the source: pin it in source.sha256 or a pinned {SUMS_FILE} (every file is verified in a cluster){store_note}",
                        l.path
                    )));
                }
            }
            for l in listed {
                let mut f = PlannedFile::new(
                    &c.name,
                    format!("{}/{}", c.name, l.path),
                    l.uri,
                    l.sha256,
                    FileKind::Entry,
                );
                f.size = l.size;
                f.git_blob = l.git_blob;
                f.auth = auth.clone();
                f.object = l.object;
                planned.push(f);
            }
        }
        Ok((planned, revisions))
    }

    /// A small listed file (a SHA256SUMS), read whole before the fill.
    async fn read_small(&self, l: &Listed, auth: Option<&HeaderValue>) -> Result<Vec<u8>, FetchError> {
        const LIMIT: usize = 4 << 20;
        if l.size.is_some_and(|n| n > LIMIT as u64) {
            return Err(FetchError::TooLarge(LIMIT as u64));
        }
        if let Some(o) = &l.object {
            return source::objects::read_small(o.store.as_ref(), &o.place, &o.key, LIMIT).await;
        }
        if l.uri.scheme() == "file" {
            let (mut f, _) = source::file::open(&l.uri, &self.policy)?;
            let mut text = Vec::new();
            (&mut f)
                .take(LIMIT as u64 + 1)
                .read_to_end(&mut text)
                .map_err(|e| FetchError::Unreachable(format!("{}: {e}", l.uri)))?;
            return Ok(text);
        }
        let (status, _, body) = source::http::get_document(&self.http, &l.uri, auth, None, LIMIT).await?;
        if !status.is_success() {
            return Err(FetchError::Status(status.as_u16()));
        }
        Ok(body)
    }

    /// The credentials Secret of a source, checked to go only where its
    /// owner meant: a spec that sets its own `endpoint` (which anyone who
    /// may write the ModelWrapper chooses) gets the Secret only when the
    /// Secret names that endpoint too (key `endpoint`), so a ModelWrapper
    /// cannot send a shared token to a server of its author's choosing.
    async fn credentials(
        &self,
        namespace: &str,
        wrapper: &str,
        component: &str,
        src: &zerocopy_api::spec::DirectorySourceSpec,
    ) -> Result<Option<crate::secrets::SecretData>, FillError> {
        let Some(secret) = &src.secret_ref else {
            return Ok(None);
        };
        let failed = |reason: String| FillError::Source {
            wrapper: wrapper.into(),
            component: component.into(),
            uri: src.uri.clone(),
            reason,
        };
        let data = self.secrets.get(namespace, &secret.name).await.map_err(failed)?;
        if let Some(endpoint) = &src.endpoint {
            let same = |a: &str, b: &str| a.trim_end_matches('/') == b.trim_end_matches('/');
            if !data.get("endpoint").is_some_and(|e| same(e.trim(), endpoint)) {
                return Err(FillError::Refused {
                    wrapper: wrapper.into(),
                    component: component.into(),
                    uri: src.uri.clone(),
                    reason: format!(
                        "the source sends Secret {namespace}/{} to its own endpoint {endpoint}, which the Secret does not name: add `endpoint: {endpoint}` to the Secret (its owner's consent), or drop the endpoint",
                        secret.name
                    ),
                    by_resolution: false,
                });
            }
        }
        Ok(Some(data))
    }

    /// The `Authorization` header for a source that names a Secret.
    async fn auth_for(
        &self,
        namespace: &str,
        wrapper: &str,
        component: &str,
        src: &zerocopy_api::spec::DirectorySourceSpec,
    ) -> Result<Option<HeaderValue>, FillError> {
        let Some(secret) = &src.secret_ref else {
            return Ok(None);
        };
        let failed = |reason: String| FillError::Source {
            wrapper: wrapper.into(),
            component: component.into(),
            uri: src.uri.clone(),
            reason,
        };
        let data = self
            .credentials(namespace, wrapper, component, src)
            .await?
            .unwrap_or_default();
        let token = data.get(secret.key()).map(|v| v.trim().to_string()).ok_or_else(|| {
            failed(format!(
                "Secret {namespace}/{} has no key {:?}",
                secret.name,
                secret.key()
            ))
        })?;
        let mut value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
            failed(format!(
                "the token in Secret {namespace}/{} is not printable ASCII",
                secret.name
            ))
        })?;
        value.set_sensitive(true);
        Ok(Some(value))
    }

    /// Stages one file from its chosen origin. Peers are tried in turn; one
    /// that fails or serves bytes with another digest is skipped (and
    /// logged), then the origin is used when it is a real source.
    async fn stage(
        &self,
        wrapper: &str,
        staging: &Path,
        plan: PlannedFile,
        limit: u64,
        progress: &dyn ProgressFactory,
    ) -> Result<StagedFile, FillError> {
        match plan.origin.clone() {
            Origin::Source => self.stage_from(wrapper, staging, plan, limit, progress, None).await,
            Origin::Upload(path) => {
                let from = Some(Fetch::Upload(path));
                self.stage_from(wrapper, staging, plan, limit, progress, from).await
            }
            Origin::Peers(urls) => {
                let mut last = None;
                for (node, url) in urls {
                    let from = Some(Fetch::Peer(url.clone()));
                    match self
                        .stage_from(wrapper, staging, plan.clone(), limit, progress, from)
                        .await
                    {
                        Ok(staged) => {
                            tracing::info!(wrapper, component = %plan.component, peer = %node, bytes = staged.bytes, "copied from a peer");
                            return Ok(staged);
                        }
                        Err(e) => {
                            tracing::warn!(wrapper, component = %plan.component, peer = %node, error = %e, "peer copy failed; trying the next source");
                            last = Some(e);
                        }
                    }
                }
                if plan.uri.scheme() == "upload" {
                    return Err(last.unwrap_or_else(|| FillError::WaitingForSource {
                        wrapper: wrapper.into(),
                        component: plan.component.clone(),
                        reason: "no peer holds it".into(),
                    }));
                }
                self.stage_from(wrapper, staging, plan, limit, progress, None).await
            }
        }
    }

    async fn stage_from(
        &self,
        wrapper: &str,
        staging: &Path,
        plan: PlannedFile,
        limit: u64,
        progress: &dyn ProgressFactory,
        from: Option<Fetch>,
    ) -> Result<StagedFile, FillError> {
        let path = staging.join(&plan.file_name);
        if let Some(parent) = path.parent().filter(|p| *p != staging) {
            fs::create_dir_all(parent).map_err(|source| FillError::Io {
                wrapper: wrapper.into(),
                action: "creating",
                path: parent.to_path_buf(),
                source,
            })?;
        }
        // Readable too: the hasher maps what the kernel copied into it.
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|source| FillError::Io {
                wrapper: wrapper.into(),
                action: "creating",
                path: path.clone(),
                source,
            })?;
        let limit = match plan.kind {
            FileKind::Weights => limit,
            // An entry may not grow past the size its listing gave (the
            // capacity check counted that size).
            FileKind::Entry if plan.is_safetensors() => limit.min(plan.size.unwrap_or(u64::MAX)),
            FileKind::Entry => limit.min(MAX_AUX_BYTES).min(plan.size.unwrap_or(u64::MAX)),
            FileKind::Skeleton | FileKind::PipelineSkeleton => limit.min(MAX_SKELETON_BYTES),
        };
        let sink = HashingSink::new(file, limit);
        if let Some(size) = plan.size.filter(|_| plan.presize) {
            sink.expect_len(size).map_err(|source| FillError::Io {
                wrapper: wrapper.into(),
                action: "sizing",
                path: path.clone(),
                source,
            })?;
        }
        let bar = progress.file(&plan.component, &plan.file_name, plan.size);
        let fetched = match (&from, plan.uri.scheme()) {
            (Some(Fetch::Peer(url)), _) => match &self.peer_http {
                Some(http) => source::http::fetch(http, url, None, sink, bar.as_ref()).await,
                None => Err(FetchError::Refused("peer fill is off".into())),
            },
            (Some(Fetch::Upload(upload)), _) => {
                let upload = upload.clone();
                let bar = bar.clone();
                let cancel = CancelOnDrop::default();
                let cancelled = cancel.0.clone();
                tokio::task::spawn_blocking(move || {
                    let src = File::open(&upload)
                        .map_err(|e| FetchError::Unreachable(format!("{}: {e}", upload.display())))?;
                    source::file::fetch(src, &upload.display().to_string(), sink, bar.as_ref(), &cancelled)
                })
                .await
                .map_err(|e| FetchError::Write(io::Error::other(e)))
                .and_then(|r| r)
            }
            (None, _) if plan.object.is_some() => match &plan.object {
                // The version whose checksum was read, if one was.
                Some(o) => {
                    source::objects::fetch(
                        o.store.as_ref(),
                        &o.place,
                        &o.key,
                        o.etag.as_deref(),
                        sink,
                        bar.as_ref(),
                    )
                    .await
                }
                None => Err(FetchError::Refused("no store".into())),
            },
            (None, "file") => {
                let uri = plan.uri.clone();
                let bar = bar.clone();
                let policy = self.policy.clone();
                // The copy runs on a blocking thread, which outlives this
                // future if the fill is stopped: tell it to stop too.
                let cancel = CancelOnDrop::default();
                let cancelled = cancel.0.clone();
                tokio::task::spawn_blocking(move || {
                    let (src, _) = source::file::open(&uri, &policy)?;
                    source::file::fetch(src, uri.path(), sink, bar.as_ref(), &cancelled)
                })
                .await
                .map_err(|e| FetchError::Write(io::Error::other(e)))
                .and_then(|r| r)
            }
            (None, _) => match plan.size.filter(|_| plan.ranges > 1) {
                Some(size) => {
                    let auth = plan.auth.as_ref();
                    let bar = bar.as_ref();
                    match source::http::fetch_ranged(&self.http, &plan.uri, auth, sink, size, plan.ranges, bar).await {
                        Ok(Ok(fetched)) => Ok(fetched),
                        // No ranges from this server: one stream.
                        Ok(Err(sink)) => source::http::fetch(&self.http, &plan.uri, auth, sink, bar).await,
                        Err(e) => Err(e),
                    }
                }
                None => source::http::fetch(&self.http, &plan.uri, plan.auth.as_ref(), sink, bar.as_ref()).await,
            },
        }
        .map_err(|e| fetch_error(wrapper, &plan, e))?;
        if fetched.resumes > 0 {
            tracing::info!(wrapper, component = %plan.component, resumes = fetched.resumes, "download resumed with Range");
        }
        if let Some(expected) = &plan.sha256 {
            if !expected.eq_ignore_ascii_case(&fetched.sha256) {
                return Err(FillError::DigestMismatch {
                    wrapper: wrapper.into(),
                    what: DigestKind::Sha256,
                    component: plan.component.clone(),
                    uri: plan.uri.to_string(),
                    expected: expected.to_ascii_lowercase(),
                    actual: fetched.sha256,
                });
            }
        }
        if let Some(expected) = plan.object.as_ref().and_then(|o| o.store_sha256.as_ref()) {
            if !expected.eq_ignore_ascii_case(&fetched.sha256) {
                return Err(FillError::DigestMismatch {
                    wrapper: wrapper.into(),
                    what: DigestKind::StoreSha256,
                    component: plan.component.clone(),
                    uri: plan.uri.to_string(),
                    expected: expected.clone(),
                    actual: fetched.sha256,
                });
            }
        }
        if let Some(expected) = &plan.git_blob {
            let io_failed = |source| FillError::Io {
                wrapper: wrapper.into(),
                action: "hashing",
                path: path.clone(),
                source,
            };
            let mut staged = File::open(&path).map_err(io_failed)?;
            let actual = source::hf::git_blob_id(&mut staged, fetched.bytes).map_err(io_failed)?;
            if !expected.eq_ignore_ascii_case(&actual) {
                return Err(FillError::DigestMismatch {
                    wrapper: wrapper.into(),
                    what: DigestKind::GitBlob,
                    component: plan.component.clone(),
                    uri: plan.uri.to_string(),
                    expected: expected.clone(),
                    actual,
                });
            }
        }
        let header = if plan.is_safetensors() {
            let h = read_header(&path, fetched.bytes).map_err(|e| match e {
                HeaderRead::Io(source) => FillError::Io {
                    wrapper: wrapper.into(),
                    action: "reading header of",
                    path: path.clone(),
                    source,
                },
                HeaderRead::Invalid(source) => FillError::Header {
                    wrapper: wrapper.into(),
                    component: plan.component.clone(),
                    uri: plan.uri.to_string(),
                    source,
                },
            })?;
            Some(h)
        } else {
            None
        };
        Ok(StagedFile {
            plan,
            bytes: fetched.bytes,
            sha256: fetched.sha256,
            header,
        })
    }

    fn publish(&self, staging: &Path, target: &Path, own_tmpfs: bool) -> io::Result<()> {
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent)?;
        }
        // A leftover without a manifest (crash between mkdir and bind) is not
        // a generation; clean_leftovers normally removed it already.
        if target.exists() {
            if mount::mount_at(target)?.is_some() {
                mount::unmount_lazy(target)?;
            }
            fs::remove_dir_all(target)?;
        }
        if own_tmpfs {
            fs::create_dir(target)?;
            if let Err(e) = mount::bind_read_only(staging, target, true) {
                let _ = fs::remove_dir(target);
                return Err(e);
            }
            // The bind keeps the tmpfs alive; the staging mount point goes.
            mount::unmount_lazy(staging)?;
            fs::remove_dir(staging)?;
        } else {
            seal(staging)?;
            fs::rename(staging, target)?;
        }
        Ok(())
    }
}

/// Removes the staging directory (and its mount) unless the fill published.
struct StagingGuard {
    path: PathBuf,
    mounted: bool,
    armed: bool,
}

impl StagingGuard {
    fn create(path: &Path) -> io::Result<Self> {
        if path.exists() {
            if mount::mount_at(path)?.is_some() {
                mount::unmount_lazy(path)?;
            }
            fs::remove_dir_all(path)?;
        }
        fs::create_dir_all(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            mounted: false,
            armed: true,
        })
    }

    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for StagingGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if self.mounted {
            if let Err(e) = mount::unmount_lazy(&self.path) {
                tracing::warn!(path = %self.path.display(), error = %e, "could not unmount staging tmpfs; the next start cleans it");
            }
        }
        if let Err(e) = fs::remove_dir_all(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "could not remove staging; the next start cleans it");
        }
    }
}

fn plan_files(spec: &ModelWrapperSpec) -> Vec<PlannedFile> {
    // validate_sources already checked every URI; parse cannot fail here.
    let parse = |s: &str| url::Url::parse(s).ok();
    let mut plan = Vec::new();
    for c in &spec.pipeline.components {
        if let Some((w, uri)) = c.weights.as_ref().and_then(|w| Some((w, parse(&w.uri)?))) {
            plan.push(PlannedFile::new(
                &c.name,
                weights_file(&c.name),
                uri,
                w.sha256.clone(),
                FileKind::Weights,
            ));
        }
        if let Some(sk) = &c.skeleton {
            if let Some(uri) = sk.uri.as_deref().and_then(parse) {
                plan.push(PlannedFile::new(
                    &c.name,
                    skeleton_file(&c.name),
                    uri,
                    sk.sha256.clone(),
                    FileKind::Skeleton,
                ));
            }
        }
    }
    if let Some(p) = &spec.pipeline.skeleton {
        if let Some(uri) = parse(&p.uri) {
            plan.push(PlannedFile::new(
                "pipeline",
                PIPELINE_SKELETON_FILE.into(),
                uri,
                p.sha256.clone(),
                FileKind::PipelineSkeleton,
            ));
        }
    }
    plan
}

/// HeadObject requests in flight at once when reading S3 checksums.
const PARALLEL_HEADS: usize = 16;

/// Reads S3's own `ChecksumSHA256` of every listed `s3://` object that has
/// no digest yet (no pin, not in a `SHA256SUMS`): a full-object checksum
/// becomes the digest its bytes are verified against; a multipart upload's
/// composite checksum is no digest of the object and is not used.
async fn store_checksums(wrapper: &str, component: &str, listed: &mut [Listed]) -> Result<(), FetchError> {
    let asks: Vec<(usize, source::objects::S3Checksums, String, String)> = listed
        .iter()
        .enumerate()
        .filter(|(_, l)| l.sha256.is_none() && l.git_blob.is_none())
        .filter_map(|(i, l)| {
            let o = l.object.as_ref()?;
            Some((i, o.checksums.clone()?, o.place.clone(), o.key.clone()))
        })
        .collect();
    if asks.is_empty() {
        return Ok(());
    }
    let heads: Vec<(usize, source::objects::ObjectHead)> = stream::iter(
        asks.into_iter()
            .map(|(i, checksums, place, key)| async move { checksums.head(&place, &key).await.map(|h| (i, h)) }),
    )
    .buffer_unordered(PARALLEL_HEADS)
    .try_collect()
    .await?;
    let (mut verified, mut composite, mut absent) = (0usize, Vec::new(), 0usize);
    for (i, head) in heads {
        let l = &mut listed[i];
        let Some(o) = l.object.as_mut() else { continue };
        match head.checksum {
            StoreChecksum::FullObject(sha) => {
                o.store_sha256 = Some(sha);
                o.etag = head.etag;
                verified += 1;
            }
            StoreChecksum::Composite => composite.push(l.path.clone()),
            StoreChecksum::Absent => absent += 1,
        }
    }
    composite.sort();
    for path in &composite {
        tracing::warn!(wrapper, component, file = %path, "S3's ChecksumSHA256 of this object is a multipart upload's composite checksum, not a digest of its bytes: it is not verified; pin it in source.sha256 or a SHA256SUMS");
    }
    tracing::info!(
        wrapper,
        component,
        verified,
        composite = composite.len(),
        without_checksum = absent,
        "S3 ChecksumSHA256 read for the files without a pin"
    );
    Ok(())
}

/// Lists the regular files below `dir`, as `(path relative to dir, size)`. Symlinks are skipped (never followed), and in a
/// cluster `dir` must lie below an allowed directory; each file is then
/// opened beneath it without following symlinks (source::file::open).
fn list_directory(policy: &SourcePolicy, dir: &Path) -> Result<Vec<Listed>, FetchError> {
    policy.file_location(dir).map_err(FetchError::Refused)?;
    if policy.file_dirs.is_some() {
        // read_dir follows symlinks in the path: in a cluster the directory
        // must be reached without any, or its names would leak from elsewhere.
        let real = fs::canonicalize(dir).map_err(|e| FetchError::Unreachable(format!("{}: {e}", dir.display())))?;
        if real != dir.components().collect::<PathBuf>() {
            return Err(FetchError::Refused(format!(
                "{} goes through a symlink (it is {}); directory sources below an allowed directory are read without following symlinks",
                dir.display(),
                real.display()
            )));
        }
    }
    let mut out = Vec::new();
    let mut pending = vec![(dir.to_path_buf(), String::new(), 0usize)];
    while let Some((at, prefix, depth)) = pending.pop() {
        let entries = fs::read_dir(&at).map_err(|e| FetchError::Unreachable(format!("{}: {e}", at.display())))?;
        for entry in entries {
            let entry = entry.map_err(|e| FetchError::Unreachable(format!("{}: {e}", at.display())))?;
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            let rel = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}/{name}")
            };
            let meta = entry
                .metadata()
                .map_err(|e| FetchError::Unreachable(format!("{}: {e}", entry.path().display())))?;
            if meta.is_dir() && depth < 16 && zerocopy_api::source::is_safe_relative_path(&rel) {
                pending.push((entry.path(), rel, depth + 1));
            } else if meta.is_file() {
                let uri = url::Url::from_file_path(entry.path()).map_err(|_| {
                    FetchError::Unreachable(format!("{} is not an absolute path", entry.path().display()))
                })?;
                out.push(Listed {
                    path: rel,
                    size: Some(meta.len()),
                    uri,
                    sha256: None,
                    git_blob: None,
                    object: None,
                });
                if out.len() > 4 * MAX_FILES {
                    return Err(FetchError::Refused(format!(
                        "{} holds more than {} files; point the source at the model's own directory",
                        dir.display(),
                        4 * MAX_FILES
                    )));
                }
            }
        }
    }
    Ok(out)
}

/// The weights files of each directory component, relative to the
/// generation: the shards `*.safetensors.index.json` names (each must be
/// there), else every top-level `.safetensors` file, sorted.
fn weights_of_directories(
    wrapper: &str,
    spec: &ModelWrapperSpec,
    staging: &Path,
    staged: &[StagedFile],
) -> Result<BTreeMap<String, Vec<String>>, FillError> {
    let mut out = BTreeMap::new();
    for c in &spec.pipeline.components {
        let Some(src) = &c.source else { continue };
        let bad = |reason: String| FillError::BadContent {
            wrapper: wrapper.into(),
            component: c.name.clone(),
            uri: src.uri.clone(),
            reason,
        };
        let prefix = format!("{}/", c.name);
        let mut top: Vec<&str> = staged
            .iter()
            .filter(|s| s.plan.kind == FileKind::Entry && s.plan.component == c.name)
            .filter_map(|s| s.plan.file_name.strip_prefix(&prefix))
            .filter(|rel| !rel.contains('/'))
            .collect();
        top.sort_unstable();
        let index = top.iter().find(|rel| rel.ends_with(".safetensors.index.json"));
        let weights: Vec<String> = match index {
            Some(index) => {
                let text = fs::read(staging.join(&prefix).join(index)).map_err(|source| FillError::Io {
                    wrapper: wrapper.into(),
                    action: "reading",
                    path: staging.join(&prefix).join(index),
                    source,
                })?;
                let parsed: serde_json::Value =
                    serde_json::from_slice(&text).map_err(|e| bad(format!("{index} is not JSON: {e}")))?;
                let map = parsed
                    .get("weight_map")
                    .and_then(|m| m.as_object())
                    .ok_or_else(|| bad(format!("{index} has no weight_map object")))?;
                let mut shards: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
                if shards.len() != map.len() {
                    return Err(bad(format!("{index}: weight_map values must be file names")));
                }
                shards.sort_unstable();
                shards.dedup();
                for shard in &shards {
                    let held = staged
                        .iter()
                        .any(|s| s.plan.file_name == format!("{prefix}{shard}") && s.header.is_some());
                    if !held {
                        return Err(bad(format!(
                            "{index} names shard {shard:?}, which the source does not hold as a .safetensors file (or include/exclude leave it out)"
                        )));
                    }
                }
                shards.into_iter().map(|s| format!("{prefix}{s}")).collect()
            }
            None => top
                .iter()
                .filter(|rel| rel.ends_with(".safetensors"))
                .map(|rel| format!("{prefix}{rel}"))
                .collect(),
        };
        if weights.is_empty() {
            return Err(bad(
                "no .safetensors file at the top of the directory (only in subfolders): the component's weights must be at its top level".into(),
            ));
        }
        out.insert(c.name.clone(), weights);
    }
    Ok(out)
}

/// Parses `sha256sum` output: `<64 hex> <space><space or *><path>` per line.
fn parse_sums(text: &[u8]) -> Result<BTreeMap<String, String>, String> {
    let text = std::str::from_utf8(text).map_err(|_| "not UTF-8 text".to_string())?;
    let mut out = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let malformed = || format!("line {} is not `<sha256>  <path>` (sha256sum's output)", i + 1);
        // Split on bytes: the first 64 must be hex (ASCII) for the split to be valid.
        let sum = line
            .get(..64)
            .filter(|s| zerocopy_api::validation::is_sha256_hex(s))
            .ok_or_else(malformed)?;
        let rest = &line[64..];
        let path = rest
            .strip_prefix("  ")
            .or_else(|| rest.strip_prefix(" *"))
            .ok_or_else(malformed)?;
        out.insert(path.trim_start_matches("./").to_string(), sum.to_ascii_lowercase());
    }
    Ok(out)
}

/// Makes a staged generation read-only for everyone: files 0444, directories 0555.
fn seal(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            seal(&entry.path())?;
        } else {
            fs::set_permissions(entry.path(), fs::Permissions::from_mode(0o444))?;
        }
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o555))
}

#[allow(clippy::too_many_arguments)]
fn build_manifest(
    namespace: &str,
    name: &str,
    generation: &str,
    spec: &ModelWrapperSpec,
    staged: Vec<StagedFile>,
    total_bytes: u64,
    revisions: &BTreeMap<String, String>,
    mut weights: BTreeMap<String, Vec<String>>,
) -> Manifest {
    let file_of = |s: &StagedFile| ManifestFile {
        file: s.plan.file_name.clone(),
        bytes: s.bytes,
        sha256: s.sha256.clone(),
        source: s.plan.uri.to_string(),
    };
    let summary = |h: &Header| SafetensorsSummary {
        tensors: h.tensors.len() as u64,
        dtypes: h.dtype_names(),
        data_offset: h.data_offset,
    };
    let find = |component: &str, kind: FileKind| {
        staged
            .iter()
            .find(|s| s.plan.component == component && s.plan.kind == kind)
    };
    let components: Vec<ManifestComponent> = spec
        .pipeline
        .components
        .iter()
        .filter_map(|c| {
            let skeleton = c.skeleton.as_ref().map(|sk| ManifestSkeleton {
                file: find(&c.name, FileKind::Skeleton).map(file_of),
                factory: sk.factory.clone(),
                kwargs: sk.kwargs.clone(),
            });
            let weights_file = match find(&c.name, FileKind::Weights) {
                Some(w) => {
                    let s = summary(w.header.as_ref()?);
                    Some(ManifestWeights {
                        file: file_of(w),
                        tensors: s.tensors,
                        dtypes: s.dtypes,
                        data_offset: s.data_offset,
                    })
                }
                None => None,
            };
            let directory = c.source.as_ref().map(|_| {
                let mut files: Vec<ManifestEntry> = staged
                    .iter()
                    .filter(|s| s.plan.component == c.name && s.plan.kind == FileKind::Entry)
                    .map(|s| ManifestEntry {
                        file: file_of(s),
                        safetensors: s.header.as_ref().map(summary),
                    })
                    .collect();
                files.sort_by(|a, b| a.file.file.cmp(&b.file.file));
                ManifestDirectory {
                    path: c.name.clone(),
                    revision: revisions.get(&c.name).cloned(),
                    weights: weights.remove(&c.name).unwrap_or_default(),
                    files,
                }
            });
            Some(ManifestComponent {
                name: c.name.clone(),
                weights: weights_file,
                directory,
                skeleton,
            })
        })
        .collect();
    let format = if components.iter().any(|c| c.directory.is_some()) {
        FORMAT_V2
    } else {
        FORMAT_V1
    };
    Manifest {
        format: format.into(),
        namespace: namespace.into(),
        name: name.into(),
        generation: generation.into(),
        mode: spec.mode,
        created: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        total_bytes,
        huge_pages: spec.memory.huge_pages,
        prefault: spec.memory.prefault,
        components,
        pipeline_skeleton: staged
            .iter()
            .find(|s| s.plan.kind == FileKind::PipelineSkeleton)
            .map(file_of),
    }
}

enum HeaderRead {
    Io(io::Error),
    Invalid(Box<zerocopy_api::safetensors::HeaderError>),
}

fn read_header(path: &Path, file_size: u64) -> Result<Header, HeaderRead> {
    let mut f = File::open(path).map_err(HeaderRead::Io)?;
    let mut prefix = [0u8; 8];
    if file_size < 8 {
        return Err(HeaderRead::Invalid(Box::new(
            zerocopy_api::safetensors::HeaderError::TooShort(file_size),
        )));
    }
    f.read_exact(&mut prefix).map_err(HeaderRead::Io)?;
    let n = header_len(&prefix);
    check_header_len(n, file_size).map_err(|e| HeaderRead::Invalid(Box::new(e)))?;
    let mut json = vec![0u8; n as usize];
    f.read_exact(&mut json).map_err(HeaderRead::Io)?;
    validate_header(&json, file_size).map_err(|e| HeaderRead::Invalid(Box::new(e)))
}

fn fetch_error(wrapper: &str, f: &PlannedFile, e: FetchError) -> FillError {
    source_error(wrapper, &f.component, f.uri.as_str(), e)
}

fn source_error(wrapper: &str, component: &str, uri: &str, e: FetchError) -> FillError {
    let (wrapper, component, uri) = (wrapper.to_string(), component.to_string(), uri.to_string());
    match e {
        FetchError::Unreachable(reason) => FillError::Source {
            wrapper,
            component,
            uri,
            reason,
        },
        FetchError::Refused(reason) => FillError::Refused {
            wrapper,
            component,
            uri,
            reason,
            by_resolution: false,
        },
        FetchError::RefusedByResolution(reason) => FillError::Refused {
            wrapper,
            component,
            uri,
            reason,
            by_resolution: true,
        },
        FetchError::Status(status) => {
            let hint = match status {
                404 => ": the file does not exist at that URI; check the path",
                401 | 403 => ": access denied; the URI needs credentials or a public object",
                _ => "",
            };
            FillError::HttpStatus {
                wrapper,
                component,
                uri,
                status,
                hint,
            }
        }
        FetchError::Truncated { got, expected, resumes } => FillError::Truncated {
            wrapper,
            component,
            uri,
            got,
            expected,
            resumes,
        },
        FetchError::TooLarge(limit) => FillError::SourceTooLarge {
            wrapper,
            component,
            uri,
            limit,
        },
        FetchError::Write(source) => FillError::Io {
            wrapper,
            action: "writing staging file for",
            path: PathBuf::from(uri),
            source,
        },
    }
}

/// A test hook: with `ZEROCOPY_FAILPOINT=<name>` in its environment the
/// agent stops itself (SIGSTOP) when a fill reaches that point, so a test
/// can SIGKILL it exactly there (node-agent/tests/standalone.rs).
fn failpoint(name: &str) {
    if std::env::var_os("ZEROCOPY_FAILPOINT").is_some_and(|v| v == name) {
        tracing::warn!(failpoint = name, "stopping at a failpoint (ZEROCOPY_FAILPOINT)");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSTOP);
    }
}

/// Generations of this many bytes or more get huge pages by default where
/// they get a tmpfs of their own (a root on disk); in the agent's root
/// tmpfs every file gets them (`crate::root_tmpfs`).
pub const HUGE_PAGES_FROM_BYTES: u64 = 1 << 30;

/// How one generation is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Backing {
    /// A tmpfs mounted for this generation alone (else a directory of the root).
    own_tmpfs: bool,
    /// Its files get transparent huge pages (where the kernel grants them).
    huge_pages: bool,
}

/// Where a generation goes. A directory of the root whenever the root is a
/// tmpfs, so running catalog pods see it (docs/csi.md); it then has the
/// root's page size. Its own tmpfs when the root is on disk, or when it asks
/// for huge pages the root does not give; own tmpfs mounts get huge pages
/// when asked for or when the generation is large.
fn choose_backing(
    mode: MountMode,
    can_mount: bool,
    root_on_tmpfs: bool,
    root_huge: bool,
    huge_pages_requested: bool,
    bytes: Option<u64>,
) -> Backing {
    let own_tmpfs = match mode {
        MountMode::Directory => false,
        MountMode::Tmpfs => true,
        MountMode::Auto => can_mount && (!root_on_tmpfs || (huge_pages_requested && !root_huge)),
    };
    let large = bytes.is_some_and(|b| b >= HUGE_PAGES_FROM_BYTES);
    Backing {
        own_tmpfs,
        huge_pages: if own_tmpfs {
            huge_pages_requested || large
        } else {
            root_huge
        },
    }
}

/// True when this process may mount (tries a tiny tmpfs and removes it).
fn can_mount(dir: &Path) -> bool {
    if !nix::unistd::geteuid().is_root() {
        return false;
    }
    let probe = dir.join(format!("mount-probe-{}", std::process::id()));
    if fs::create_dir_all(&probe).is_err() {
        return false;
    }
    let ok = mount::mount_tmpfs(&probe, 4096, false).is_ok();
    if ok {
        let _ = mount::unmount_lazy(&probe);
    }
    let _ = fs::remove_dir(&probe);
    ok
}

fn host_memory() -> u64 {
    nix::sys::sysinfo::sysinfo().map(|s| s.ram_total()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_live_in_the_root_tmpfs_and_take_its_page_size() {
        use MountMode::*;
        let gib = Some(HUGE_PAGES_FROM_BYTES);
        let small = Some(1 << 20);
        let dir = |huge_pages| Backing {
            own_tmpfs: false,
            huge_pages,
        };
        let own = |huge_pages| Backing {
            own_tmpfs: true,
            huge_pages,
        };
        // The agent's huge root: every generation is a directory with huge pages.
        for requested in [false, true] {
            for bytes in [small, gib, None] {
                assert_eq!(choose_backing(Auto, true, true, true, requested, bytes), dir(true));
            }
        }
        // A plain /dev/shm root: directories with 4 KiB pages, unless asked.
        assert_eq!(choose_backing(Auto, true, true, false, false, gib), dir(false));
        assert_eq!(choose_backing(Auto, true, true, false, true, small), own(true));
        assert_eq!(choose_backing(Auto, false, true, false, true, small), dir(false));
        // A root on disk: an own tmpfs, huge pages from 1 GiB or when asked.
        assert_eq!(choose_backing(Auto, true, false, false, false, small), own(false));
        assert_eq!(choose_backing(Auto, true, false, false, false, None), own(false));
        assert_eq!(choose_backing(Auto, true, false, false, false, gib), own(true));
        assert_eq!(choose_backing(Auto, true, false, false, true, small), own(true));
        assert_eq!(choose_backing(Tmpfs, true, true, true, false, gib), own(true));
        assert_eq!(choose_backing(Directory, true, true, true, true, gib), dir(true));
    }

    #[test]
    fn sums_files_parse_as_sha256sum_writes_them() {
        let a = "a".repeat(64);
        let b = "B".repeat(64);
        let text = format!("{a}  model-00001-of-00002.safetensors\n{b} *1_Pooling/config.json\n\n");
        let sums = parse_sums(text.as_bytes()).unwrap_or_default();
        assert_eq!(sums.get("model-00001-of-00002.safetensors"), Some(&a));
        assert_eq!(sums.get("1_Pooling/config.json"), Some(&"b".repeat(64)));
        assert!(parse_sums(b"abc  x\n").is_err());
        // A multi-byte character across byte 64 is an error, not a panic.
        assert!(parse_sums(format!("{}\u{e9}  x\n", "a".repeat(63)).as_bytes()).is_err());
        assert!(parse_sums(format!("{a}x\n").as_bytes()).is_err());
    }
}
