//! Bytes between machines without external storage: `from_model()` in a pod
//! uploads its export to the agent of its node, and agents that hold a
//! verified copy serve it to the other agents, so the origin (a driver, or an
//! http(s)/file source) sends each byte about once however many nodes fill.
//!
//! ```text
//! PUT /v1/uploads/<namespace>/<wrapper>/<sha256>   Bearer <upload token>
//! GET /v1/uploads/<namespace>/<wrapper>/<sha256>   200 held, 404 not yet
//! GET /v1/blobs/<sha256>                           Bearer <peer token>
//! ```
//!
//! An upload is accepted only for a wrapper placed on this node, whose spec
//! has an `upload:` source with that sha256 and whose
//! `zerocopy.dev/upload-token-sha256` annotation is the sha256 of the bearer
//! token: only someone who may write the ModelWrapper can set it. The bytes
//! are verified against the digest before they become visible. Blobs are
//! served only to holders of the cluster's peer token (a Secret mounted
//! into agents alone). Receivers verify every byte against the spec's
//! sha256 whoever sent it.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use zerocopy_api::validation::{is_sha256_hex, UPLOAD_URI};
use zerocopy_api::ModelWrapperSpec;

use crate::csi::catalog::Catalog;
use crate::layout::VolumeRoot;

/// Uploads wait here, one file per sha256, until a generation holds their
/// bytes (a fill copies them into its staging directory).
pub const UPLOADS_DIR: &str = ".uploads";

/// What this agent knows about other nodes' copies of one generation.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PeerView {
    /// `(node, endpoint)` of other nodes where the generation is Ready.
    pub ready: Vec<(String, String)>,
    /// Other nodes, ordered before this one, that will fetch it from the
    /// origin first: this node waits for them instead of fetching too.
    pub earlier_fillers: Vec<String>,
    /// The peer list does not show this node's own replica yet, so it may
    /// miss earlier ones too: wait for it rather than guess.
    pub catching_up: bool,
}

/// Where peers' copies are; the cluster mode reads it from ModelReplicas.
pub trait PeerDirectory: Send + Sync {
    /// The view for one generation.
    fn view(&self, namespace: &str, name: &str, generation: &str) -> PeerView;
}

/// No peers (standalone).
#[derive(Debug, Default)]
pub struct NoPeers;

impl PeerDirectory for NoPeers {
    fn view(&self, _: &str, _: &str, _: &str) -> PeerView {
        PeerView::default()
    }
}

/// Where an upload of `sha256` for a wrapper of `namespace` lies once
/// verified. Per namespace: a fill takes only its own namespace's uploads,
/// so knowing another tenant's digest gets nobody its bytes.
pub fn upload_path(root: &VolumeRoot, namespace: &str, sha256: &str) -> PathBuf {
    root.path().join(UPLOADS_DIR).join(namespace).join(sha256)
}

/// `(namespace directory, its entries)` under `.uploads`.
fn upload_dirs(root: &VolumeRoot) -> io::Result<Vec<(PathBuf, String)>> {
    let dir = root.path().join(UPLOADS_DIR);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            out.push((entry.path(), entry.file_name().to_string_lossy().into_owned()));
        }
    }
    Ok(out)
}

/// Removes uploads no wanted wrapper still waits for: their bytes are in a
/// generation now (or nobody wants them). Partial files belong to uploads in
/// progress; [`remove_partial_uploads`] clears a crashed process's at start.
/// Returns how many were removed.
pub fn collect_uploads(root: &VolumeRoot, still_needed: &dyn Fn(&str, &str) -> bool) -> io::Result<usize> {
    let mut removed = 0;
    for (dir, namespace) in upload_dirs(root)? {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let keep = is_sha256_hex(&name) && still_needed(&namespace, &name);
            if !keep && !name.ends_with(".partial") {
                std::fs::remove_file(entry.path())?;
                removed += 1;
            }
        }
        let _ = std::fs::remove_dir(&dir); // only when empty
    }
    Ok(removed)
}

/// Removes partial uploads a previous process left (called before serving).
pub fn remove_partial_uploads(root: &VolumeRoot) -> io::Result<usize> {
    let mut removed = 0;
    for (dir, _) in upload_dirs(root)? {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            if entry.file_name().to_string_lossy().ends_with(".partial") {
                std::fs::remove_file(entry.path())?;
                removed += 1;
            }
        }
    }
    Ok(removed)
}

/// The peer and upload HTTP server's state.
#[derive(Clone)]
pub struct PeerServer {
    /// Where generations and uploads live.
    pub root: VolumeRoot,
    /// What is wanted here (for upload checks).
    pub catalog: Arc<Catalog>,
    /// The token other agents present; `None` disables blob serving.
    pub peer_token: Option<String>,
    /// This node, for messages.
    pub node: String,
    /// Largest upload accepted.
    pub max_upload_bytes: u64,
}

impl PeerServer {
    /// Uploads from pods.
    pub fn uploads_router(self: &Arc<Self>) -> axum::Router {
        use axum::routing::get;
        axum::Router::new()
            .route(
                "/v1/uploads/{namespace}/{name}/{sha256}",
                get(upload_status).put(upload),
            )
            .with_state(self.clone())
    }

    /// Blob reads by other agents.
    pub fn blobs_router(self: &Arc<Self>) -> axum::Router {
        use axum::routing::get;
        axum::Router::new()
            .route("/v1/blobs/{sha256}", get(blob))
            .with_state(self.clone())
    }

    fn find_blob(&self, sha256: &str) -> Option<(PathBuf, u64)> {
        for g in self.root.generations().ok()? {
            let Some(m) = &g.manifest else { continue };
            if let Some(f) = m.files().find(|f| f.sha256 == sha256) {
                return Some((g.path.join(&f.file), f.bytes));
            }
        }
        None
    }

    /// Checks an uploader: `Ok(())` or the status and message to answer.
    fn authorize_upload(
        &self,
        namespace: &str,
        name: &str,
        sha256: &str,
        headers: &HeaderMap,
    ) -> Result<(), (StatusCode, String)> {
        if !is_sha256_hex(sha256) || sha256.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err((
                StatusCode::BAD_REQUEST,
                format!("{sha256:?} is not a lowercase hex sha256"),
            ));
        }
        let Some(wanted) = self.catalog.wanted(namespace, name) else {
            // 503: the operator may not have placed it here yet; uploaders retry.
            return Err((
                StatusCode::SERVICE_UNAVAILABLE,
                format!("ModelWrapper {namespace}/{name} is not placed on node {} (yet): retry once the operator placed it here", self.node),
            ));
        };
        let Some(expected) = wanted.upload_token_sha256 else {
            return Err((
                StatusCode::FORBIDDEN,
                format!("ModelWrapper {namespace}/{name} has no zerocopy.dev/upload-token-sha256 annotation: nobody may upload to it"),
            ));
        };
        let token = bearer(headers).ok_or((
            StatusCode::UNAUTHORIZED,
            "an upload needs `Authorization: Bearer <token>` with the token whose sha256 the ModelWrapper's zerocopy.dev/upload-token-sha256 annotation holds".to_string(),
        ))?;
        if hex::encode(Sha256::digest(token.as_bytes())) != expected.to_ascii_lowercase() {
            return Err((
                StatusCode::FORBIDDEN,
                format!("the token does not match ModelWrapper {namespace}/{name}'s zerocopy.dev/upload-token-sha256 annotation"),
            ));
        }
        if !declares_upload(&wanted.spec, sha256) {
            return Err((
                StatusCode::CONFLICT,
                format!("ModelWrapper {namespace}/{name} declares no `uri: {UPLOAD_URI}` source with sha256 {sha256}"),
            ));
        }
        Ok(())
    }
}

/// True when `spec` has an `upload:` source pinned to `sha256`.
pub fn declares_upload(spec: &ModelWrapperSpec, sha256: &str) -> bool {
    let mut sources = Vec::new();
    for c in &spec.pipeline.components {
        if let Some(w) = &c.weights {
            sources.push((w.uri.as_str(), w.sha256.as_deref()));
        }
        if let Some(sk) = &c.skeleton {
            if let Some(uri) = &sk.uri {
                sources.push((uri.as_str(), sk.sha256.as_deref()));
            }
        }
    }
    if let Some(p) = &spec.pipeline.skeleton {
        sources.push((p.uri.as_str(), p.sha256.as_deref()));
    }
    sources
        .into_iter()
        .any(|(uri, sha)| uri == UPLOAD_URI && sha.is_some_and(|s| s.eq_ignore_ascii_case(sha256)))
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// Compares through digests, so the time taken says nothing about how much
/// of the token matched.
fn same_secret(a: &str, b: &str) -> bool {
    Sha256::digest(a.as_bytes()) == Sha256::digest(b.as_bytes())
}

async fn blob(
    State(s): State<Arc<PeerServer>>,
    UrlPath(sha256): UrlPath<String>,
    method: axum::http::Method,
    headers: HeaderMap,
) -> Response {
    let Some(expected) = &s.peer_token else {
        return (
            StatusCode::FORBIDDEN,
            "peer serving is off on this agent (no --peer-token-file)",
        )
            .into_response();
    };
    if !bearer(&headers).is_some_and(|t| same_secret(t, expected)) {
        tracing::warn!(sha256, "blob request without the peer token refused");
        return (StatusCode::UNAUTHORIZED, "only node agents may read blobs").into_response();
    }
    if !is_sha256_hex(&sha256) {
        return (StatusCode::BAD_REQUEST, "not a sha256").into_response();
    }
    let found = tokio::task::block_in_place(|| s.find_blob(&sha256));
    let Some((path, size)) = found else {
        return (StatusCode::NOT_FOUND, format!("node {} holds no blob {sha256}", s.node)).into_response();
    };
    match tokio::fs::File::open(&path).await {
        Ok(f) => {
            if method != axum::http::Method::HEAD {
                tracing::info!(sha256, bytes = size, "serving a blob to a peer");
            }
            let body = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(f, 1 << 20));
            ([(header::CONTENT_LENGTH, size.to_string())], body).into_response()
        }
        Err(e) => (StatusCode::NOT_FOUND, format!("{}: {e}", path.display())).into_response(),
    }
}

async fn upload_status(
    State(s): State<Arc<PeerServer>>,
    UrlPath((namespace, name, sha256)): UrlPath<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Err((code, msg)) = s.authorize_upload(&namespace, &name, &sha256, &headers) {
        return (code, msg).into_response();
    }
    // Only an upload counts: a generation elsewhere on the node holding the
    // same bytes is not a source a fill of this wrapper takes.
    if upload_path(&s.root, &namespace, &sha256).is_file() {
        (StatusCode::OK, "held").into_response()
    } else {
        (StatusCode::NOT_FOUND, "not uploaded yet").into_response()
    }
}

async fn upload(
    State(s): State<Arc<PeerServer>>,
    UrlPath((namespace, name, sha256)): UrlPath<(String, String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // A refused or failed upload ends the connection (its body is not read
    // whole), and says so, so the client does not reuse it for its next
    // request; a small body is read first so the client, still sending,
    // gets the answer rather than a reset.
    let closing = [(axum::http::header::CONNECTION, "close")];
    if let Err((code, msg)) = s.authorize_upload(&namespace, &name, &sha256, &headers) {
        tracing::warn!(%namespace, %name, sha256, code = code.as_u16(), error = %msg, "upload refused");
        discard(body, REFUSED_BODY_READ).await;
        return (code, closing, msg).into_response();
    }
    match receive(&s, &namespace, &sha256, body).await {
        Ok(bytes) => {
            tracing::info!(%namespace, %name, sha256, bytes, "upload verified");
            // Fills waiting for it look again at their next (short) retry.
            s.catalog.changed.notify_waiters();
            (StatusCode::CREATED, format!("{bytes} bytes verified")).into_response()
        }
        Err((code, msg)) => {
            tracing::warn!(%namespace, %name, sha256, code = code.as_u16(), error = %msg, "upload failed");
            (code, closing, msg).into_response()
        }
    }
}

/// Most bytes of a refused upload's body read (and dropped) before the
/// answer.
const REFUSED_BODY_READ: u64 = 16 << 20;

/// Reads and drops up to `limit` bytes of `body`.
async fn discard(body: Body, limit: u64) {
    let mut read = 0u64;
    let mut stream = body.into_data_stream();
    while read < limit {
        match stream.next().await {
            Some(Ok(chunk)) => read += chunk.len() as u64,
            _ => return,
        }
    }
}

/// Streams the body into a private file, hashing it; only bytes with the
/// declared digest are renamed to where fills look.
async fn receive(s: &PeerServer, namespace: &str, sha256: &str, body: Body) -> Result<u64, (StatusCode, String)> {
    let internal = |what: &str, e: io::Error| (StatusCode::INTERNAL_SERVER_ERROR, format!("{what}: {e}"));
    // `namespace` is one a wanted wrapper has (authorize_upload), a DNS label.
    let dir = s.root.path().join(UPLOADS_DIR).join(namespace);
    std::fs::create_dir_all(&dir).map_err(|e| internal("creating the upload directory", e))?;
    let partial = dir.join(format!(
        "{sha256}.{}.{}.partial",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    let mut guard = RemoveOnDrop(Some(partial.clone()));
    let mut file = std::fs::File::create(&partial).map_err(|e| internal("creating the upload file", e))?;
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| (StatusCode::BAD_REQUEST, format!("reading the body: {e}")))?;
        bytes += chunk.len() as u64;
        if bytes > s.max_upload_bytes {
            return Err((
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("more than the {} bytes this node may hold", s.max_upload_bytes),
            ));
        }
        hasher.update(&chunk);
        tokio::task::block_in_place(|| file.write_all(&chunk)).map_err(|e| internal("writing the upload", e))?;
    }
    let actual = hex::encode(hasher.finalize());
    if actual != sha256 {
        return Err((
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("the body's sha256 is {actual}, not {sha256}: nothing was kept"),
        ));
    }
    let target = upload_path(&s.root, namespace, sha256);
    std::fs::rename(&partial, &target).map_err(|e| internal("publishing the upload", e))?;
    guard.0 = None;
    Ok(bytes)
}

struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The URL of a blob on a peer.
pub fn blob_url(endpoint: &str, sha256: &str) -> Result<url::Url, url::ParseError> {
    url::Url::parse(&format!("{}/v1/blobs/{sha256}", endpoint.trim_end_matches('/')))
}

/// True when `path` and `root` are on one filesystem (a hard link works).
pub fn same_filesystem(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev(),
        _ => false,
    }
}
