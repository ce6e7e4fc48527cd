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
use object_store::{ClientOptions, ObjectStore};

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

/// Streams one object into `sink`.
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
    progress.set_total(expected);
    let mut stream = got.into_stream();
    while let Some(chunk) = stream.next().await {
        let bytes = chunk.map_err(|e| describe(place, key, e))?;
        let n = bytes.len() as u64;
        tokio::task::block_in_place(|| sink.write(bytes))
            .map_err(FetchError::Write)?
            .map_err(|o| FetchError::TooLarge(o.limit))?;
        progress.advance(n);
    }
    if sink.written() != expected {
        return Err(FetchError::Truncated {
            got: sink.written(),
            expected,
            resumes: 0,
        });
    }
    let (bytes, sha256) = tokio::task::block_in_place(|| sink.finish()).map_err(FetchError::Write)?;
    Ok(Fetched {
        bytes,
        sha256,
        resumes: 0,
    })
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
