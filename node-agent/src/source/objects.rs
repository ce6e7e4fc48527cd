//! Object stores through the `object_store` crate: `s3://bucket/prefix/`
//! (S3 and S3-compatible servers) and `az://account/container/prefix/`
//! (Azure Blob Storage, Azurite). Requests go through the agent's own HTTP
//! client, every URL checked, so the source policy (no metadata or
//! link-local addresses; internal ones only where allowed; names resolved
//! once) applies to store endpoints as to any URL.
//!
//! Credentials come only from a Secret the wrapper's namespace shared (S3:
//! `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, optionally
//! `AWS_SESSION_TOKEN`; Azure: `AZURE_STORAGE_SAS_TOKEN` or
//! `AZURE_STORAGE_ACCOUNT_KEY`); without one, requests are unsigned (public
//! buckets and containers). The agent's own workload identity is never
//! used: every tenant could then read whatever the agent's role can
//! (docs/security.md).

use std::sync::Arc;

use base64::Engine as _;
use futures_util::StreamExt;
use object_store::aws::{AmazonS3Builder, AwsAuthorizer, AwsCredential};
use object_store::azure::MicrosoftAzureBuilder;
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpRequestBody, HttpResponse, HttpService,
};
use object_store::path::Path as StorePath;
use object_store::{ClientOptions, GetOptions, GetRange, ObjectStore};

use super::http::HttpSource;
use super::policy::{check_url, PolicyRefusal, SourcePolicy};
use super::sink::HashingSink;
use super::{FetchError, Fetched, Progress};
use crate::secrets::SecretData;

/// Region when the spec gives none.
pub const DEFAULT_REGION: &str = "us-east-1";

/// Hands object_store the agent's client, with every request's URL checked
/// against the policy first: names are checked by the client's resolver,
/// but an IP address in the URL (an endpoint of `http://169.254.169.254`)
/// is never resolved, so it is checked here.
#[derive(Debug, Clone)]
pub(crate) struct PolicyConnector {
    client: reqwest::Client,
    policy: Arc<SourcePolicy>,
}

impl PolicyConnector {
    pub(crate) fn of(http: &HttpSource) -> Self {
        Self {
            client: http.client().clone(),
            policy: http.policy().clone(),
        }
    }
}

impl HttpConnector for PolicyConnector {
    fn connect(&self, _: &ClientOptions) -> object_store::Result<HttpClient> {
        Ok(HttpClient::new(self.clone()))
    }
}

#[async_trait::async_trait]
impl HttpService for PolicyConnector {
    async fn call(&self, req: HttpRequest) -> Result<HttpResponse, HttpError> {
        let url = url::Url::parse(&req.uri().to_string()).map_err(|e| HttpError::new(HttpErrorKind::Request, e))?;
        if let Err(reason) = check_url(&self.policy, &url) {
            // object_store wraps this error; the classification in
            // `describe` finds it again by type.
            let refused = PolicyRefusal {
                message: format!("{url} is refused by the agent's source policy: {reason}"),
                by_resolution: false,
            };
            // `Unknown`: object_store retries `Request` and `Connect` errors
            // for minutes; a refusal is the agent's answer, not a fault.
            return Err(HttpError::new(HttpErrorKind::Unknown, refused));
        }
        match self.client.call(req).await {
            // The resolver's refusal arrives as a connect error: the same.
            // The fill decides whether to try again.
            Err(e) if PolicyRefusal::find(&e).is_some() => Err(HttpError::new(HttpErrorKind::Unknown, e)),
            answer => answer,
        }
    }
}

/// True for an AWS region name (`us-east-1`, `eu-central-2`): it becomes
/// part of a host name, so nothing else may pass.
pub fn is_region(region: &str) -> bool {
    !region.is_empty()
        && region.len() <= 32
        && region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// A bucket: the `object_store` client that lists and reads it, and the
/// reader of its objects' own checksums.
#[derive(Debug, Clone)]
pub struct S3Bucket {
    /// Lists and reads objects.
    pub store: Arc<dyn ObjectStore>,
    /// Reads an object's `ChecksumSHA256`.
    pub checksums: S3Checksums,
}

/// A bucket client. `endpoint`: an S3-compatible server (path-style
/// requests), else AWS; `credentials`: a shared Secret's keys.
pub fn bucket(
    http: &HttpSource,
    bucket: &str,
    endpoint: Option<&str>,
    region: Option<&str>,
    credentials: Option<&SecretData>,
) -> Result<S3Bucket, FetchError> {
    let region = region.unwrap_or(DEFAULT_REGION);
    if !is_region(region) {
        return Err(FetchError::Refused(format!("{region:?} is not an S3 region name")));
    }
    let mut builder = AmazonS3Builder::new()
        .with_bucket_name(bucket)
        .with_region(region)
        .with_http_connector(PolicyConnector::of(http));
    // The URL object_store puts keys below (path-style, as configured here).
    let bucket_url = match endpoint {
        Some(endpoint) => {
            checked_endpoint(http, endpoint)?;
            builder = builder
                .with_endpoint(endpoint)
                .with_allow_http(endpoint.starts_with("http://"))
                .with_virtual_hosted_style_request(false);
            format!("{}/{bucket}", endpoint.trim_end_matches('/'))
        }
        None => format!("https://s3.{region}.amazonaws.com/{bucket}"),
    };
    let credential = credentials.map(aws_credential).transpose()?;
    match &credential {
        Some(c) => {
            builder = builder
                .with_access_key_id(&c.key_id)
                .with_secret_access_key(&c.secret_key);
            if let Some(token) = &c.token {
                builder = builder.with_token(token);
            }
        }
        None => builder = builder.with_skip_signature(true),
    }
    let store = builder
        .build()
        .map_err(|e| FetchError::Unreachable(format!("s3://{bucket}: {e}")))?;
    Ok(S3Bucket {
        store: Arc::new(store),
        checksums: S3Checksums {
            http: PolicyConnector::of(http),
            bucket_url,
            region: region.to_string(),
            credential: credential.map(Arc::new),
        },
    })
}

/// The keys of a credentials Secret. Each must be a valid header value
/// (the signer puts them in headers and would panic on a newline).
fn aws_credential(keys: &SecretData) -> Result<AwsCredential, FetchError> {
    let get = |k: &str| -> Result<Option<String>, FetchError> {
        let Some(v) = keys.get(k) else { return Ok(None) };
        let v = v.trim().to_string();
        if v.is_empty() || reqwest::header::HeaderValue::from_str(&v).is_err() {
            return Err(FetchError::Unreachable(format!(
                "the credentials Secret's {k} is empty or holds characters a request header cannot carry"
            )));
        }
        Ok(Some(v))
    };
    let required =
        |k: &str| get(k)?.ok_or_else(|| FetchError::Unreachable(format!("the credentials Secret has no key {k}")));
    Ok(AwsCredential {
        key_id: required("AWS_ACCESS_KEY_ID")?,
        secret_key: required("AWS_SECRET_ACCESS_KEY")?,
        token: get("AWS_SESSION_TOKEN")?,
    })
}

/// What an S3 object says about its own sha256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreChecksum {
    /// The sha256 of the whole object (lowercase hex): uploaded in one part
    /// with `ChecksumAlgorithm=SHA256`, or with a `FULL_OBJECT` checksum.
    FullObject(String),
    /// A multipart upload's checksum of its parts' checksums (`<b64>-<parts>`,
    /// type `COMPOSITE`): no digest of the object's bytes.
    Composite,
    /// No SHA256 checksum (uploaded without one, or a server that keeps none).
    Absent,
}

/// An object's checksum and the ETag of the version it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectHead {
    /// Its `ChecksumSHA256`.
    pub checksum: StoreChecksum,
    /// Its ETag as the server wrote it (quotes included), for `If-Match`.
    pub etag: Option<String>,
}

/// Reads `x-amz-checksum-sha256` (`x-amz-checksum-type`) of an object with
/// `HeadObject` and `x-amz-checksum-mode: ENABLED`, which `object_store`
/// neither sends nor exposes. The request goes through the agent's checked
/// client and is signed (object_store's own SigV4 signer) with the source's
/// keys when it has any, so the extra header is signed too.
#[derive(Clone)]
pub struct S3Checksums {
    http: PolicyConnector,
    /// `<endpoint>/<bucket>` or `https://s3.<region>.amazonaws.com/<bucket>`.
    bucket_url: String,
    region: String,
    credential: Option<Arc<AwsCredential>>,
}

impl std::fmt::Debug for S3Checksums {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Checksums")
            .field("bucket_url", &self.bucket_url)
            .field("region", &self.region)
            .field("signed", &self.credential.is_some())
            .finish()
    }
}

impl S3Checksums {
    /// `HeadObject` of `key` with checksum mode on. `place` is
    /// `s3://bucket`, for messages.
    pub async fn head(&self, place: &str, key: &str) -> Result<ObjectHead, FetchError> {
        let url = format!("{}/{}", self.bucket_url, encode_key(key));
        let mut request = HttpRequest::new(HttpRequestBody::empty());
        *request.method_mut() = reqwest::Method::HEAD;
        *request.uri_mut() = url
            .parse()
            .map_err(|e| FetchError::Unreachable(format!("{place}/{key}: {e}")))?;
        request.headers_mut().insert(
            "x-amz-checksum-mode",
            reqwest::header::HeaderValue::from_static("ENABLED"),
        );
        if let Some(credential) = &self.credential {
            AwsAuthorizer::new(credential, "s3", &self.region).authorize(&mut request, None);
        }
        let response = self.http.call(request).await.map_err(|e| {
            describe(
                place,
                key,
                object_store::Error::Generic {
                    store: "S3",
                    source: Box::new(e),
                },
            )
        })?;
        match response.status().as_u16() {
            200..=299 => {}
            404 => {
                return Err(describe(
                    place,
                    key,
                    object_store::Error::NotFound {
                        path: key.to_string(),
                        source: "HeadObject answered 404".into(),
                    },
                ))
            }
            401 | 403 => {
                return Err(describe(
                    place,
                    key,
                    object_store::Error::PermissionDenied {
                        path: key.to_string(),
                        source: "HeadObject answered 403".into(),
                    },
                ))
            }
            // A server that does not take the request as sent: no checksum
            // from it (the GET still reads the object).
            status @ (400 | 405 | 501) => {
                tracing::warn!(%place, %key, status, "HeadObject with x-amz-checksum-mode was refused; the object's ChecksumSHA256 is not read");
                return Ok(ObjectHead {
                    checksum: StoreChecksum::Absent,
                    etag: None,
                });
            }
            status => {
                return Err(FetchError::Unreachable(format!(
                    "{place}/{key}: HeadObject (reading its ChecksumSHA256) answered HTTP {status}"
                )))
            }
        }
        let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok());
        let checksum = parse_sha256_checksum(
            header("x-amz-checksum-sha256"),
            header("x-amz-checksum-type"),
            header("etag"),
        )
        .map_err(|reason| FetchError::Unreachable(format!("{place}/{key}: {reason}")))?;
        Ok(ObjectHead {
            checksum,
            etag: header("etag").map(str::to_string),
        })
    }
}

/// A key as object_store puts it in a URL: every byte but unreserved ones
/// and `/` percent-encoded, as SigV4's canonical URI expects.
fn encode_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Reads S3's answer: `value` from `x-amz-checksum-sha256` (base64 of the
/// 32-byte digest, `-<parts>` appended for a multipart upload's composite
/// checksum), `kind` from `x-amz-checksum-type`. Without a type (older
/// servers, HeadObject on some), an ETag ending in `-<parts>` marks a
/// multipart upload, whose SHA256 checksum is composite (S3 keeps SHA256
/// full-object checksums only for single-part uploads).
pub fn parse_sha256_checksum(
    value: Option<&str>,
    kind: Option<&str>,
    etag: Option<&str>,
) -> Result<StoreChecksum, String> {
    let Some(value) = value.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(StoreChecksum::Absent);
    };
    let has_parts = |v: &str| {
        v.rsplit_once('-')
            .is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    match kind.map(str::trim) {
        Some(k) if k.eq_ignore_ascii_case("COMPOSITE") => return Ok(StoreChecksum::Composite),
        Some(k) if k.eq_ignore_ascii_case("FULL_OBJECT") => {}
        Some(k) => {
            return Err(format!(
                "S3 answered checksum type {k:?}, neither FULL_OBJECT nor COMPOSITE"
            ))
        }
        None if has_parts(etag.unwrap_or_default().trim_matches('"')) => return Ok(StoreChecksum::Composite),
        None => {}
    }
    if has_parts(value) {
        return Ok(StoreChecksum::Composite);
    }
    match base64::engine::general_purpose::STANDARD.decode(value) {
        Ok(digest) if digest.len() == 32 => Ok(StoreChecksum::FullObject(hex::encode(digest))),
        _ => Err(format!(
            "S3 answered x-amz-checksum-sha256 {value:?}, which is not the base64 of a 32-byte sha256"
        )),
    }
}

/// Refuses an endpoint the source policy does not allow, before any request.
fn checked_endpoint(http: &HttpSource, endpoint: &str) -> Result<(), FetchError> {
    let parsed = url::Url::parse(endpoint)
        .map_err(|e| FetchError::Refused(format!("endpoint {endpoint:?} is not a URL: {e}")))?;
    check_url(http.policy(), &parsed).map_err(|reason| FetchError::Refused(format!("endpoint {endpoint}: {reason}")))
}

/// An Azure container client. `endpoint`: the account's blob endpoint
/// (Azurite: `http://host:port/<account>`), else
/// `https://<account>.blob.core.windows.net`; `credentials`: a shared
/// Secret's `AZURE_STORAGE_SAS_TOKEN` (query string) or
/// `AZURE_STORAGE_ACCOUNT_KEY`.
pub fn container(
    http: &HttpSource,
    account: &str,
    container: &str,
    endpoint: Option<&str>,
    credentials: Option<&SecretData>,
) -> Result<Arc<dyn ObjectStore>, FetchError> {
    let mut builder = MicrosoftAzureBuilder::new()
        .with_account(account)
        .with_container_name(container)
        .with_http_connector(PolicyConnector::of(http));
    if let Some(endpoint) = endpoint {
        checked_endpoint(http, endpoint)?;
        builder = builder
            .with_endpoint(endpoint.trim_end_matches('/').to_string())
            .with_allow_http(endpoint.starts_with("http://"));
    }
    match credentials {
        Some(keys) => {
            if let Some(sas) = keys.get("AZURE_STORAGE_SAS_TOKEN") {
                let pairs: Vec<(String, String)> =
                    url::form_urlencoded::parse(sas.trim().trim_start_matches('?').as_bytes())
                        .map(|(k, v)| (k.into_owned(), v.into_owned()))
                        .collect();
                builder = builder.with_sas_authorization(pairs);
            } else if let Some(key) = keys.get("AZURE_STORAGE_ACCOUNT_KEY") {
                builder = builder.with_access_key(key.trim());
            } else {
                return Err(FetchError::Unreachable(
                    "the credentials Secret has neither AZURE_STORAGE_SAS_TOKEN nor AZURE_STORAGE_ACCOUNT_KEY".into(),
                ));
            }
        }
        None => builder = builder.with_skip_signature(true),
    }
    let store = builder
        .build()
        .map_err(|e| FetchError::Unreachable(format!("az://{account}/{container}: {e}")))?;
    Ok(Arc::new(store))
}

/// Every object below `prefix`: `(path relative to the prefix, size)`, at
/// most `max` of them.
pub async fn list(
    store: &dyn ObjectStore,
    place: &str,
    prefix: &str,
    max: usize,
) -> Result<Vec<(String, u64)>, FetchError> {
    let under = StorePath::from(prefix.trim_end_matches('/'));
    let mut objects = store.list(if prefix.is_empty() { None } else { Some(&under) });
    let mut out = Vec::new();
    while let Some(meta) = objects.next().await {
        let meta = meta.map_err(|e| describe(place, prefix, e))?;
        let key = meta.location.as_ref();
        let rel = key.strip_prefix(prefix).unwrap_or(key);
        out.push((rel.to_string(), meta.size));
        if out.len() > max {
            return Err(FetchError::Refused(format!(
                "{place}/{prefix} holds more than {max} objects; point the source at the model's own prefix"
            )));
        }
    }
    Ok(out)
}

/// One small object read whole, at most `limit` bytes.
pub async fn read_small(store: &dyn ObjectStore, place: &str, key: &str, limit: usize) -> Result<Vec<u8>, FetchError> {
    let got = store
        .get(&StorePath::from(key))
        .await
        .map_err(|e| describe(place, key, e))?;
    let mut stream = got.into_stream();
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| describe(place, key, e))?;
        if out.len() + chunk.len() > limit {
            return Err(FetchError::TooLarge(limit as u64));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// Reads of one object resumed after a cut before the fetch gives up (the
/// fill is then retried whole, with backoff).
const MAX_RESUMES: u32 = 3;

/// Streams one object into `sink`. A stream cut short resumes from the
/// first missing byte with a ranged read that must match the first
/// answer's ETag (`If-Match`), so two versions of an object are never
/// spliced: a changed object fails the fetch instead.
///
/// `if_match`: the ETag of the version whose checksum was read, so the
/// bytes read are of that version (else the fetch fails: the fill starts over).
pub async fn fetch(
    store: &dyn ObjectStore,
    place: &str,
    key: &str,
    if_match: Option<&str>,
    mut sink: HashingSink,
    progress: &dyn Progress,
) -> Result<Fetched, FetchError> {
    let location = StorePath::from(key);
    let first = GetOptions {
        if_match: if_match.map(str::to_string),
        ..GetOptions::default()
    };
    let got = store
        .get_opts(&location, first)
        .await
        .map_err(|e| changed(place, key, e))?;
    let expected = got.meta.size;
    let etag = got.meta.e_tag.clone();
    progress.set_total(expected);
    let mut stream = got.into_stream();
    let mut resumes = 0u32;
    loop {
        let cut = loop {
            match stream.next().await {
                None => break None,
                Some(Err(e)) => break Some(e),
                Some(Ok(bytes)) => {
                    let n = bytes.len() as u64;
                    tokio::task::block_in_place(|| sink.write(bytes))
                        .map_err(FetchError::Write)?
                        .map_err(|o| FetchError::TooLarge(o.limit))?;
                    progress.advance(n);
                }
            }
        };
        let written = sink.written();
        let Some(error) = cut else { break };
        let Some(etag) = etag.clone().filter(|_| resumes < MAX_RESUMES && written < expected) else {
            return Err(describe(place, key, error));
        };
        resumes += 1;
        tracing::info!(%place, %key, written, expected, resumes, error = %error, "object read cut short; resuming from the first missing byte");
        let options = GetOptions {
            range: Some(GetRange::Offset(written)),
            if_match: Some(etag),
            ..GetOptions::default()
        };
        let again = store
            .get_opts(&location, options)
            .await
            .map_err(|e| changed(place, key, e))?;
        stream = again.into_stream();
    }
    if sink.written() != expected {
        return Err(FetchError::Truncated {
            got: sink.written(),
            expected,
            resumes,
        });
    }
    let (bytes, sha256) = tokio::task::block_in_place(|| sink.finish()).map_err(FetchError::Write)?;
    Ok(Fetched { bytes, sha256, resumes })
}

/// A failed `If-Match` read: the object is not the version first seen.
fn changed(place: &str, key: &str, e: object_store::Error) -> FetchError {
    match e {
        object_store::Error::Precondition { .. } => FetchError::Unreachable(format!(
            "{place}/{key} changed while it was read (its ETag differs); the fill starts over"
        )),
        e => describe(place, key, e),
    }
}

/// `place` is the source's `scheme://bucket` (or account/container).
fn describe(place: &str, key: &str, e: object_store::Error) -> FetchError {
    match e {
        object_store::Error::NotFound { .. } => FetchError::Unreachable(format!(
            "{place}/{key} does not exist (or the bucket or container does not)"
        )),
        object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. } => {
            FetchError::Unreachable(format!(
                "{place}/{key}: access denied; give the source a credentials Secret that may read it (source.secretRef; docs/security.md lists the keys)"
            ))
        }
        other => {
            // object_store's message stops at "error sending request": a
            // refusal names its own reason.
            match PolicyRefusal::find(&other) {
                Some(r) if r.by_resolution => FetchError::RefusedByResolution(format!("{place}/{key}: {}", r.message)),
                Some(r) => FetchError::Refused(format!("{place}/{key}: {}", r.message)),
                None => FetchError::Unreachable(format!("{place}/{key}: {other}")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::ops::Range;
    use std::sync::Mutex;

    use bytes::Bytes;
    use futures_util::stream::BoxStream;
    use object_store::memory::InMemory;
    use object_store::{
        GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta, PutMultipartOptions, PutOptions,
        PutPayload, PutResult,
    };

    use super::*;
    use crate::source::NoProgress;

    /// An in-memory store whose first `cuts` reads end with an error after
    /// `cut_at` bytes (a connection reset mid-object); `replace_on_cut`
    /// overwrites the object at the first cut (a new version uploaded
    /// meanwhile). Records the byte range each read asked for.
    #[derive(Debug)]
    struct CuttingStore {
        inner: InMemory,
        cut_at: usize,
        cuts: Mutex<u32>,
        replace_on_cut: Option<Bytes>,
        asked: Mutex<Vec<Option<GetRange>>>,
    }

    impl std::fmt::Display for CuttingStore {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("CuttingStore")
        }
    }

    #[async_trait::async_trait]
    impl ObjectStore for CuttingStore {
        async fn put_opts(&self, l: &StorePath, p: PutPayload, o: PutOptions) -> object_store::Result<PutResult> {
            self.inner.put_opts(l, p, o).await
        }
        async fn put_multipart_opts(
            &self,
            l: &StorePath,
            o: PutMultipartOptions,
        ) -> object_store::Result<Box<dyn MultipartUpload>> {
            self.inner.put_multipart_opts(l, o).await
        }
        async fn get_opts(&self, l: &StorePath, o: GetOptions) -> object_store::Result<GetResult> {
            self.asked.lock().unwrap().push(o.range.clone());
            let got = self.inner.get_opts(l, o).await?;
            let (meta, range, attributes) = (got.meta.clone(), got.range.clone(), got.attributes.clone());
            let body = got.bytes().await?;
            let cut = {
                let mut cuts = self.cuts.lock().unwrap();
                let cut = *cuts > 0 && body.len() > self.cut_at;
                *cuts -= u32::from(cut);
                cut
            };
            let chunks: Vec<object_store::Result<Bytes>> = if cut {
                if let Some(new) = &self.replace_on_cut {
                    self.inner.put(l, new.clone().into()).await?;
                }
                vec![
                    Ok(body.slice(..self.cut_at)),
                    Err(object_store::Error::Generic {
                        store: "test",
                        source: "connection reset by peer".into(),
                    }),
                ]
            } else {
                vec![Ok(body)]
            };
            Ok(GetResult {
                payload: GetResultPayload::Stream(Box::pin(futures_util::stream::iter(chunks))),
                meta,
                range,
                attributes,
            })
        }
        async fn delete(&self, l: &StorePath) -> object_store::Result<()> {
            self.inner.delete(l).await
        }
        fn list(&self, p: Option<&StorePath>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
            self.inner.list(p)
        }
        async fn list_with_delimiter(&self, p: Option<&StorePath>) -> object_store::Result<ListResult> {
            self.inner.list_with_delimiter(p).await
        }
        async fn copy(&self, a: &StorePath, b: &StorePath) -> object_store::Result<()> {
            self.inner.copy(a, b).await
        }
        async fn copy_if_not_exists(&self, a: &StorePath, b: &StorePath) -> object_store::Result<()> {
            self.inner.copy_if_not_exists(a, b).await
        }
    }

    async fn store(body: &Bytes, cut_at: usize, cuts: u32, replace_on_cut: Option<Bytes>) -> CuttingStore {
        let inner = InMemory::new();
        inner
            .put(&StorePath::from("m/model.safetensors"), body.clone().into())
            .await
            .unwrap();
        CuttingStore {
            inner,
            cut_at,
            cuts: Mutex::new(cuts),
            replace_on_cut,
            asked: Mutex::new(Vec::new()),
        }
    }

    fn sink(dir: &tempfile::TempDir) -> HashingSink {
        HashingSink::new(std::fs::File::create(dir.path().join("out")).unwrap(), u64::MAX)
    }

    fn body(seed: u8) -> Bytes {
        (0..10u32 << 20)
            .map(|i| (i % 251) as u8 ^ seed)
            .collect::<Vec<u8>>()
            .into()
    }

    /// base64 of sha256("hello world"), as S3 writes it.
    const HELLO_B64: &str = "uU0nuZNNPgilLlLX2n2r+sSE7+N6U4DukIj3rOLvzek=";
    const HELLO_HEX: &str = "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9";

    #[test]
    fn a_full_object_checksum_becomes_the_hex_sha256() {
        let full = StoreChecksum::FullObject(HELLO_HEX.into());
        assert_eq!(
            parse_sha256_checksum(Some(HELLO_B64), None, Some("\"5eb63bbbe01eeed093cb22bb8f5acdc3\"")),
            Ok(full.clone())
        );
        assert_eq!(
            parse_sha256_checksum(Some(HELLO_B64), Some("FULL_OBJECT"), None),
            Ok(full.clone())
        );
        // A FULL_OBJECT type says so even for a multipart upload.
        assert_eq!(
            parse_sha256_checksum(Some(HELLO_B64), Some("FULL_OBJECT"), Some("\"abc-3\"")),
            Ok(full)
        );
    }

    #[test]
    fn a_composite_checksum_is_never_a_digest() {
        let composite = Ok(StoreChecksum::Composite);
        assert_eq!(
            parse_sha256_checksum(Some(&format!("{HELLO_B64}-3")), None, None),
            composite
        );
        assert_eq!(
            parse_sha256_checksum(Some(&format!("{HELLO_B64}-3")), Some("COMPOSITE"), None),
            composite
        );
        assert_eq!(
            parse_sha256_checksum(Some(HELLO_B64), Some("COMPOSITE"), None),
            composite
        );
        // No type, no suffix, but a multipart upload's ETag: composite.
        assert_eq!(
            parse_sha256_checksum(Some(HELLO_B64), None, Some("\"0f343b0931126a20f133d67c2b018a3b-1\"")),
            composite
        );
    }

    #[test]
    fn no_checksum_and_malformed_checksums() {
        assert_eq!(
            parse_sha256_checksum(None, None, Some("\"abc\"")),
            Ok(StoreChecksum::Absent)
        );
        assert_eq!(parse_sha256_checksum(Some(" "), None, None), Ok(StoreChecksum::Absent));
        for bad in ["not base64!", "AAAA", &HELLO_HEX[..44]] {
            let err = parse_sha256_checksum(Some(bad), None, None).unwrap_err();
            assert!(err.contains("not the base64 of a 32-byte sha256"), "{err}");
        }
        let err = parse_sha256_checksum(Some(HELLO_B64), Some("SOMETHING"), None).unwrap_err();
        assert!(err.contains("neither FULL_OBJECT nor COMPOSITE"), "{err}");
    }

    #[test]
    fn keys_are_encoded_as_object_store_encodes_them() {
        assert_eq!(
            encode_key("m/model-00001-of-00002.safetensors"),
            "m/model-00001-of-00002.safetensors"
        );
        assert_eq!(encode_key("a b/c+d=é~"), "a%20b/c%2Bd%3D%C3%A9~");
    }

    #[test]
    fn a_credential_a_header_cannot_carry_is_refused() {
        let keys = |id: &str| {
            SecretData::from([
                ("AWS_ACCESS_KEY_ID".to_string(), id.to_string()),
                ("AWS_SECRET_ACCESS_KEY".to_string(), "s".to_string()),
            ])
        };
        assert!(
            aws_credential(&keys(" AKIA\n")).is_ok(),
            "surrounding whitespace is trimmed"
        );
        let err = aws_credential(&keys("AK\nIA")).unwrap_err().to_string();
        assert!(err.contains("AWS_ACCESS_KEY_ID"), "{err}");
        let err = aws_credential(&SecretData::new()).unwrap_err().to_string();
        assert!(err.contains("no key AWS_ACCESS_KEY_ID"), "{err}");
    }

    /// Serves one HTTP answer on 127.0.0.1 and hands back the request's head.
    async fn one_answer(answer: &'static str) -> (String, tokio::task::JoinHandle<String>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let served = tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = conn.read(&mut buf).await.unwrap();
                assert!(n > 0, "the client closed before the request ended");
                head.extend_from_slice(&buf[..n]);
            }
            conn.write_all(answer.as_bytes()).await.unwrap();
            conn.shutdown().await.unwrap();
            String::from_utf8(head).unwrap()
        });
        (endpoint, served)
    }

    #[test]
    fn a_policy_refusal_inside_object_stores_errors_is_found_by_type() {
        let wrapped = |by_resolution: bool| object_store::Error::Generic {
            store: "S3",
            source: Box::new(HttpError::new(
                HttpErrorKind::Connect,
                PolicyRefusal {
                    message: "host minio.internal resolves to a refused address: 10.0.0.7 is a private address".into(),
                    by_resolution,
                },
            )),
        };
        let by_dns = describe("s3://models", "llm/", wrapped(true));
        assert!(
            matches!(&by_dns, FetchError::RefusedByResolution(m) if m.contains("10.0.0.7 is a private address")),
            "{by_dns:?}"
        );
        assert!(matches!(
            describe("s3://models", "llm/", wrapped(false)),
            FetchError::Refused(_)
        ));
        let other = object_store::Error::Generic {
            store: "S3",
            source: Box::new(HttpError::new(
                HttpErrorKind::Connect,
                std::io::Error::other("connection refused"),
            )),
        };
        assert!(matches!(
            describe("s3://models", "llm/", other),
            FetchError::Unreachable(_)
        ));
    }

    #[tokio::test]
    async fn an_endpoint_whose_name_resolves_to_a_refused_address_is_refused_without_retries() {
        let http = HttpSource::new(Arc::new(SourcePolicy::cluster(vec![], vec![]))).unwrap();
        // Nothing listens on port 9: only the policy can answer.
        let b = bucket(&http, "models", Some("http://localhost:9"), None, None).unwrap();
        let raw = b
            .store
            .list(Some(&StorePath::from("llm")))
            .next()
            .await
            .unwrap()
            .unwrap_err();
        // object_store's message says "after N retries" once it has retried.
        assert!(!raw.to_string().contains("retries"), "{raw}");
        let err = describe("s3://models", "llm/", raw);
        assert!(
            matches!(&err, FetchError::RefusedByResolution(m) if m.starts_with("s3://models/llm/: host localhost resolves to a refused address")),
            "{err:?}"
        );
    }

    fn s3(endpoint: &str, credentials: Option<&SecretData>) -> S3Bucket {
        let http = HttpSource::new(Arc::new(SourcePolicy::standalone())).unwrap();
        bucket(&http, "models", Some(endpoint), None, credentials).unwrap()
    }

    #[tokio::test]
    async fn head_asks_for_the_checksum_with_a_signed_header() {
        let (endpoint, served) = one_answer(
            "HTTP/1.1 200 OK\r\ncontent-length: 11\r\netag: \"5eb63bbbe01eeed093cb22bb8f5acdc3\"\r\nx-amz-checksum-sha256: uU0nuZNNPgilLlLX2n2r+sSE7+N6U4DukIj3rOLvzek=\r\nx-amz-checksum-type: FULL_OBJECT\r\n\r\n",
        )
        .await;
        let keys = SecretData::from([
            ("AWS_ACCESS_KEY_ID".to_string(), "AKIDEXAMPLE".to_string()),
            ("AWS_SECRET_ACCESS_KEY".to_string(), "secret".to_string()),
            ("AWS_SESSION_TOKEN".to_string(), "token".to_string()),
        ]);
        let head = s3(&endpoint, Some(&keys))
            .checksums
            .head("s3://models", "m/a b.safetensors")
            .await
            .unwrap();
        assert_eq!(head.checksum, StoreChecksum::FullObject(HELLO_HEX.into()));
        assert_eq!(head.etag.as_deref(), Some("\"5eb63bbbe01eeed093cb22bb8f5acdc3\""));
        let request = served.await.unwrap().to_ascii_lowercase();
        assert!(
            request.starts_with("head /models/m/a%20b.safetensors http/1.1\r\n"),
            "{request}"
        );
        assert!(request.contains("\r\nx-amz-checksum-mode: enabled\r\n"), "{request}");
        let signed = request
            .lines()
            .find_map(|l| l.strip_prefix("authorization: aws4-hmac-sha256 credential=akidexample/"))
            .and_then(|l| l.split("signedheaders=").nth(1))
            .and_then(|l| l.split(',').next())
            .unwrap_or_else(|| panic!("no SigV4 authorization in {request}"));
        assert!(signed.split(';').any(|h| h == "x-amz-checksum-mode"), "{signed}");
        assert!(signed.split(';').any(|h| h == "x-amz-security-token"), "{signed}");
    }

    #[tokio::test]
    async fn a_server_that_refuses_checksum_mode_gives_no_checksum() {
        let (endpoint, served) = one_answer("HTTP/1.1 501 Not Implemented\r\ncontent-length: 0\r\n\r\n").await;
        let head = s3(&endpoint, None)
            .checksums
            .head("s3://models", "m/a.safetensors")
            .await
            .unwrap();
        assert_eq!(head.checksum, StoreChecksum::Absent);
        served.await.unwrap();
        let (endpoint, served) = one_answer("HTTP/1.1 503 Slow Down\r\ncontent-length: 0\r\n\r\n").await;
        let err = s3(&endpoint, None)
            .checksums
            .head("s3://models", "m/a.safetensors")
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("s3://models/m/a.safetensors: HeadObject (reading its ChecksumSHA256) answered HTTP 503"),
            "{err}"
        );
        served.await.unwrap();
    }

    #[tokio::test]
    async fn head_without_credentials_is_unsigned_and_a_missing_object_is_named() {
        let (endpoint, served) = one_answer("HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n").await;
        let err = s3(&endpoint, None)
            .checksums
            .head("s3://models", "m/gone.safetensors")
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("s3://models/m/gone.safetensors does not exist"), "{err}");
        let request = served.await.unwrap().to_ascii_lowercase();
        assert!(!request.contains("authorization:"), "{request}");
        assert!(request.contains("x-amz-checksum-mode: enabled"), "{request}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_object_replaced_after_its_checksum_was_read_is_not_read() {
        let store = store(&body(0), 0, 0, None).await;
        let dir = tempfile::tempdir().unwrap();
        let err = fetch(
            &store,
            "s3://b",
            "m/model.safetensors",
            Some("\"an-older-version\""),
            sink(&dir),
            &NoProgress,
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("changed while it was read"), "{err}");
        let etag = store
            .inner
            .head(&StorePath::from("m/model.safetensors"))
            .await
            .unwrap()
            .e_tag;
        fetch(
            &store,
            "s3://b",
            "m/model.safetensors",
            etag.as_deref(),
            sink(&dir),
            &NoProgress,
        )
        .await
        .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cut_object_read_resumes_from_the_first_missing_byte() {
        let body = body(0);
        let store = store(&body, 3 << 20, 2, None).await;
        let dir = tempfile::tempdir().unwrap();
        let fetched = fetch(&store, "s3://b", "m/model.safetensors", None, sink(&dir), &NoProgress)
            .await
            .unwrap();
        assert_eq!(fetched.resumes, 2);
        assert_eq!(std::fs::read(dir.path().join("out")).unwrap(), body.as_ref());
        assert_eq!(
            fetched.sha256,
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&body))
        );
        let asked: Vec<Option<Range<u64>>> = store
            .asked
            .lock()
            .unwrap()
            .iter()
            .map(|r| match r {
                None => None,
                Some(GetRange::Offset(o)) => Some(*o..body.len() as u64),
                Some(other) => panic!("unexpected range {other:?}"),
            })
            .collect();
        assert_eq!(
            asked,
            vec![None, Some(3 << 20..10 << 20), Some(6 << 20..10 << 20)],
            "each resume starts where the last read stopped, never at byte 0"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_object_replaced_mid_read_is_never_spliced() {
        let store = store(&body(0), 3 << 20, 1, Some(body(7))).await;
        let dir = tempfile::tempdir().unwrap();
        let err = fetch(&store, "s3://b", "m/model.safetensors", None, sink(&dir), &NoProgress)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("changed while it was read"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_cut_more_often_than_the_resume_budget_fails() {
        let store = store(&body(0), 1 << 20, MAX_RESUMES + 1, None).await;
        let dir = tempfile::tempdir().unwrap();
        let err = fetch(&store, "s3://b", "m/model.safetensors", None, sink(&dir), &NoProgress)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("connection reset by peer"), "{err}");
        assert_eq!(store.asked.lock().unwrap().len() as u32, MAX_RESUMES + 1);
    }
}
