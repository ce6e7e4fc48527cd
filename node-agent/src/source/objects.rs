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

use futures_util::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpResponse, HttpService,
};
use object_store::path::Path as StorePath;
use object_store::{ClientOptions, GetOptions, GetRange, ObjectStore};

use super::http::HttpSource;
use super::policy::{check_url, SourcePolicy};
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

/// Marks a URL the policy refused before any lookup (object_store wraps our
/// error, so the classification below finds it by this text).
const REFUSED_BY_POLICY: &str = "is refused by the agent's source policy";

#[async_trait::async_trait]
impl HttpService for PolicyConnector {
    async fn call(&self, req: HttpRequest) -> Result<HttpResponse, HttpError> {
        let url = url::Url::parse(&req.uri().to_string()).map_err(|e| HttpError::new(HttpErrorKind::Request, e))?;
        if let Err(reason) = check_url(&self.policy, &url) {
            let refused = std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!("{url} {REFUSED_BY_POLICY}: {reason}"),
            );
            return Err(HttpError::new(HttpErrorKind::Request, refused));
        }
        self.client.call(req).await
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

/// A bucket client. `endpoint`: an S3-compatible server (path-style
/// requests), else AWS; `credentials`: a shared Secret's keys.
pub fn bucket(
    http: &HttpSource,
    bucket: &str,
    endpoint: Option<&str>,
    region: Option<&str>,
    credentials: Option<&SecretData>,
) -> Result<Arc<dyn ObjectStore>, FetchError> {
    let region = region.unwrap_or(DEFAULT_REGION);
    if !is_region(region) {
        return Err(FetchError::Refused(format!("{region:?} is not an S3 region name")));
    }
    let mut builder = AmazonS3Builder::new()
        .with_bucket_name(bucket)
        .with_region(region)
        .with_http_connector(PolicyConnector::of(http));
    if let Some(endpoint) = endpoint {
        checked_endpoint(http, endpoint)?;
        builder = builder
            .with_endpoint(endpoint)
            .with_allow_http(endpoint.starts_with("http://"))
            .with_virtual_hosted_style_request(false);
    }
    match credentials {
        Some(keys) => {
            let get = |k: &str| {
                keys.get(k)
                    .map(|v| v.trim().to_string())
                    .ok_or_else(|| FetchError::Unreachable(format!("the credentials Secret has no key {k}")))
            };
            builder = builder
                .with_access_key_id(get("AWS_ACCESS_KEY_ID")?)
                .with_secret_access_key(get("AWS_SECRET_ACCESS_KEY")?);
            if let Some(token) = keys.get("AWS_SESSION_TOKEN") {
                builder = builder.with_token(token.trim());
            }
        }
        None => builder = builder.with_skip_signature(true),
    }
    let store = builder
        .build()
        .map_err(|e| FetchError::Unreachable(format!("s3://{bucket}: {e}")))?;
    Ok(Arc::new(store))
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
pub async fn fetch(
    store: &dyn ObjectStore,
    place: &str,
    key: &str,
    mut sink: HashingSink,
    progress: &dyn Progress,
) -> Result<Fetched, FetchError> {
    let location = StorePath::from(key);
    let got = store.get(&location).await.map_err(|e| describe(place, key, e))?;
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
        let again = store.get_opts(&location, options).await.map_err(|e| match e {
            object_store::Error::Precondition { .. } => FetchError::Unreachable(format!(
                "{place}/{key} changed while it was read (its ETag differs); the fill starts over"
            )),
            e => describe(place, key, e),
        })?;
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
            let text = other.to_string();
            if text.contains(super::policy::REFUSED_BY_RESOLUTION) || text.contains(REFUSED_BY_POLICY) {
                FetchError::Refused(format!("{place}/{key}: {text}"))
            } else {
                FetchError::Unreachable(format!("{place}/{key}: {text}"))
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cut_object_read_resumes_from_the_first_missing_byte() {
        let body = body(0);
        let store = store(&body, 3 << 20, 2, None).await;
        let dir = tempfile::tempdir().unwrap();
        let fetched = fetch(&store, "s3://b", "m/model.safetensors", sink(&dir), &NoProgress)
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
        let err = fetch(&store, "s3://b", "m/model.safetensors", sink(&dir), &NoProgress)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("changed while it was read"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_cut_more_often_than_the_resume_budget_fails() {
        let store = store(&body(0), 1 << 20, MAX_RESUMES + 1, None).await;
        let dir = tempfile::tempdir().unwrap();
        let err = fetch(&store, "s3://b", "m/model.safetensors", sink(&dir), &NoProgress)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("connection reset by peer"), "{err}");
        assert_eq!(store.asked.lock().unwrap().len() as u32, MAX_RESUMES + 1);
    }
}
