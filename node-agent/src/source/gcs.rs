//! `gs://bucket/prefix/`: Google Cloud Storage through its JSON API, the
//! one the official clients speak: objects are listed with
//! `GET /storage/v1/b/<bucket>/o?prefix=` and read with `alt=media` (ranged
//! like any HTTP file, through the agent's policy-checked client).
//!
//! Credentials come only from a Secret the wrapper's namespace shared:
//! `GOOGLE_SERVICE_ACCOUNT_KEY` (a service-account JSON key; the agent
//! exchanges it for an access token through `object_store`'s Google
//! credential code, over the same checked client) or
//! `GOOGLE_OAUTH_ACCESS_TOKEN` (a token the user refreshes). Without one,
//! requests carry no credentials (public buckets). The agent's own workload
//! identity (the metadata server) is never used (docs/security.md).

use reqwest::header::HeaderValue;
use serde::Deserialize;

use super::http::{get_document, HttpSource};
use super::FetchError;
use crate::secrets::SecretData;

/// Google's endpoint, when the source names none.
pub const DEFAULT_ENDPOINT: &str = "https://storage.googleapis.com";
/// Objects asked for per listing page (the API's maximum).
const PAGE: &str = "1000";
/// Largest listing page read.
const MAX_PAGE_BYTES: usize = 16 << 20;

/// One object below the prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcsObject {
    /// Full object name.
    pub name: String,
    /// Bytes.
    pub size: u64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Page {
    #[serde(default)]
    items: Vec<Item>,
    next_page_token: Option<String>,
}

#[derive(Deserialize)]
struct Item {
    name: String,
    /// The JSON API writes 64-bit numbers as strings.
    size: String,
}

/// The endpoint for a source: its own (checked by the caller's policy on
/// every request) or Google's.
pub fn endpoint(spec_endpoint: Option<&str>) -> Result<url::Url, FetchError> {
    let raw = spec_endpoint.unwrap_or(DEFAULT_ENDPOINT);
    let url = url::Url::parse(raw).map_err(|e| FetchError::Refused(format!("endpoint {raw:?} is not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.query().is_some() {
        return Err(FetchError::Refused(format!(
            "endpoint {raw:?}: write the storage server's base URL, e.g. {DEFAULT_ENDPOINT}"
        )));
    }
    Ok(url)
}

/// `Authorization` for a bucket, from the shared Secret's keys (`None`:
/// anonymous).
pub async fn authorization(
    http: &HttpSource,
    endpoint: &url::Url,
    bucket: &str,
    credentials: Option<&SecretData>,
) -> Result<Option<HeaderValue>, FetchError> {
    let Some(keys) = credentials else {
        return Ok(None);
    };
    let token = if let Some(token) = keys.get("GOOGLE_OAUTH_ACCESS_TOKEN") {
        token.trim().to_string()
    } else if let Some(key) = keys.get("GOOGLE_SERVICE_ACCOUNT_KEY") {
        service_account_token(http, endpoint, bucket, key).await?
    } else {
        return Err(FetchError::Unreachable(
            "the credentials Secret has neither GOOGLE_SERVICE_ACCOUNT_KEY nor GOOGLE_OAUTH_ACCESS_TOKEN".into(),
        ));
    };
    let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| FetchError::Unreachable("the Google token in the Secret is not printable ASCII".into()))?;
    value.set_sensitive(true);
    Ok(Some(value))
}

/// Exchanges a service-account key for an access token (a signed JWT sent
/// to the key's `token_uri`), through the policy-checked client.
async fn service_account_token(
    http: &HttpSource,
    endpoint: &url::Url,
    bucket: &str,
    key: &str,
) -> Result<String, FetchError> {
    let mut parsed: serde_json::Value = serde_json::from_str(key)
        .map_err(|e| FetchError::Unreachable(format!("GOOGLE_SERVICE_ACCOUNT_KEY is not a JSON key file: {e}")))?;
    // object_store reads the storage endpoint from the key file.
    if let Some(map) = parsed.as_object_mut() {
        map.insert("gcs_base_url".into(), endpoint.as_str().trim_end_matches('/').into());
    }
    let store = object_store::gcp::GoogleCloudStorageBuilder::new()
        .with_bucket_name(bucket)
        .with_service_account_key(parsed.to_string())
        .with_http_connector(super::objects::PolicyConnector::of(http))
        .build()
        .map_err(|e| FetchError::Unreachable(format!("gs://{bucket}: the service-account key: {e}")))?;
    let credential =
        store.credentials().get_credential().await.map_err(|e| {
            FetchError::Unreachable(format!("gs://{bucket}: no access token for the service account: {e}"))
        })?;
    Ok(credential.bearer.clone())
}

/// Every object below `prefix` (at most `max`).
pub async fn list(
    http: &HttpSource,
    endpoint: &url::Url,
    bucket: &str,
    prefix: &str,
    auth: Option<&HeaderValue>,
    max: usize,
) -> Result<Vec<GcsObject>, FetchError> {
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut url = api_url(endpoint, &["storage", "v1", "b", bucket, "o"])?;
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("prefix", prefix)
                .append_pair("maxResults", PAGE)
                .append_pair("fields", "items(name,size),nextPageToken");
            if let Some(t) = &token {
                q.append_pair("pageToken", t);
            }
        }
        let (status, _, body) = get_document(http, &url, auth, None, MAX_PAGE_BYTES).await?;
        if !status.is_success() {
            let hint = match status.as_u16() {
                404 => ": the bucket does not exist",
                401 | 403 => ": access denied; give the source a credentials Secret that may list the bucket (source.secretRef; docs/security.md lists the keys)",
                _ => "",
            };
            return Err(FetchError::Unreachable(format!(
                "gs://{bucket}/{prefix}: listing answered HTTP {}{hint}",
                status.as_u16()
            )));
        }
        let page: Page = serde_json::from_slice(&body)
            .map_err(|e| FetchError::Unreachable(format!("gs://{bucket}: not a JSON API object listing: {e}")))?;
        for item in page.items {
            let size = item.size.parse().map_err(|_| {
                FetchError::Unreachable(format!("gs://{bucket}: object {} has size {:?}", item.name, item.size))
            })?;
            out.push(GcsObject { name: item.name, size });
            if out.len() > max {
                // Like every other listing: the spec points at too much,
                // which trying again will not change.
                return Err(FetchError::Refused(format!(
                    "gs://{bucket}/{prefix} holds more than {max} objects; point the source at the model's own prefix"
                )));
            }
        }
        match page.next_page_token {
            Some(t) if !t.is_empty() => token = Some(t),
            _ => return Ok(out),
        }
    }
}

/// The URL that reads one object's bytes (`alt=media`).
pub fn media_url(endpoint: &url::Url, bucket: &str, name: &str) -> Result<url::Url, FetchError> {
    let mut url = api_url(endpoint, &["storage", "v1", "b", bucket, "o", name])?;
    url.query_pairs_mut().append_pair("alt", "media");
    Ok(url)
}

/// `endpoint` joined with path segments, each percent-encoded whole (an
/// object name's `/` becomes `%2F`, as the JSON API wants).
fn api_url(endpoint: &url::Url, segments: &[&str]) -> Result<url::Url, FetchError> {
    let mut url = endpoint.clone();
    url.path_segments_mut()
        .map_err(|_| FetchError::Refused(format!("endpoint {endpoint} cannot take a path")))?
        .pop_if_empty()
        .extend(segments);
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_names_are_one_encoded_segment() {
        let e = endpoint(None).unwrap();
        assert_eq!(
            media_url(&e, "models", "llm/model-00001-of-00002.safetensors")
                .unwrap()
                .as_str(),
            "https://storage.googleapis.com/storage/v1/b/models/o/llm%2Fmodel-00001-of-00002.safetensors?alt=media"
        );
        let local = endpoint(Some("http://127.0.0.1:9023/")).unwrap();
        assert_eq!(
            media_url(&local, "b", "a b/c?d").unwrap().as_str(),
            "http://127.0.0.1:9023/storage/v1/b/b/o/a%20b%2Fc%3Fd?alt=media"
        );
    }

    #[test]
    fn endpoints_are_base_urls() {
        assert!(endpoint(Some("ftp://x")).is_err());
        assert!(endpoint(Some("https://x/?a=b")).is_err());
        assert!(endpoint(Some("not a url")).is_err());
    }
}
