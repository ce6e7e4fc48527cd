//! `http(s)://` sources: streamed with bounded memory, resumed with `Range`
//! when the connection drops and the server supports it.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use reqwest::header::{HeaderValue, ACCEPT_RANGES, CONTENT_RANGE, ETAG, IF_RANGE, LAST_MODIFIED, RANGE};
use reqwest::StatusCode;

use super::policy::{check_url, redirect_policy, CheckedResolver, PolicyRefusal, SourcePolicy};
use super::sink::HashingSink;
use super::{FetchError, Fetched, Progress};

/// Resumptions of one body before it is declared truncated.
const MAX_RESUMES: u32 = 3;
/// Attempts to connect before the source is declared unreachable.
const CONNECT_ATTEMPTS: u32 = 3;

/// The HTTP client of one fill engine, with the policy it enforces.
#[derive(Clone)]
pub struct HttpSource {
    client: reqwest::Client,
    policy: Arc<SourcePolicy>,
}

impl HttpSource {
    /// A client (rustls) that connects only to addresses `policy` allows:
    /// names are resolved once by [`CheckedResolver`] and the connection goes
    /// to the checked address; every redirect hop is checked, https never
    /// downgrades to http. Proxies from the environment are honoured only
    /// when the policy says so (`--use-env-proxy`): the proxy then decides
    /// where requests go, so it must enforce the same egress rules.
    pub fn new(policy: Arc<SourcePolicy>) -> reqwest::Result<Self> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(60))
            .user_agent(concat!("zerocopy-node-agent/", env!("CARGO_PKG_VERSION")))
            .dns_resolver(Arc::new(CheckedResolver::new(policy.clone())))
            .redirect(redirect_policy(policy.clone()));
        if !policy.use_env_proxy {
            builder = builder.no_proxy();
        }
        let client = builder.build()?;
        Ok(Self { client, policy })
    }

    /// The client for other node agents: their endpoints come from
    /// ModelReplica statuses only agents write (not from a tenant's spec),
    /// so internal addresses are allowed; no redirects, no proxies, and the
    /// peer token on every request.
    pub fn for_peers(token: &str) -> Result<Self, String> {
        let mut auth = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| "the peer token must be printable ASCII".to_string())?;
        auth.set_sensitive(true);
        let headers = reqwest::header::HeaderMap::from_iter([(reqwest::header::AUTHORIZATION, auth)]);
        let policy = Arc::new(SourcePolicy {
            use_env_proxy: false,
            ..SourcePolicy::standalone()
        });
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(60))
            .user_agent(concat!("zerocopy-node-agent/", env!("CARGO_PKG_VERSION"), " (peer)"))
            .default_headers(headers)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self { client, policy })
    }

    /// The policy every request of this client is held to.
    pub fn policy(&self) -> &Arc<SourcePolicy> {
        &self.policy
    }

    /// The underlying client, for libraries that make their own requests
    /// (object_store): the policy's resolver and redirect checks come with it.
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    fn check(&self, uri: &url::Url) -> Result<(), FetchError> {
        check_url(&self.policy, uri).map_err(|reason| FetchError::Refused(format!("{uri}: {reason}")))
    }
}

/// The announced size, from a HEAD request; `None` when the server does not
/// say or refuses HEAD (S3 and GCS presigned GET URLs answer 403 to it): the
/// GET then decides.
pub async fn size(http: &HttpSource, uri: &url::Url, auth: Option<&HeaderValue>) -> Result<Option<u64>, FetchError> {
    http.check(uri)?;
    let resp = send_with_retry(with_auth(http.client.head(uri.clone()), auth)).await?;
    if !resp.status().is_success() {
        tracing::debug!(%uri, status = resp.status().as_u16(), "HEAD refused; the size is learnt from the GET");
        return Ok(None);
    }
    Ok(resp
        .headers()
        .get(reqwest::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok()))
}

/// Streams the body into `sink`.
pub async fn fetch(
    http: &HttpSource,
    uri: &url::Url,
    auth: Option<&HeaderValue>,
    mut sink: HashingSink,
    progress: &dyn Progress,
) -> Result<Fetched, FetchError> {
    http.check(uri)?;
    let mut resumes = 0u32;
    let mut expected: Option<u64> = None;
    let mut can_resume = false;
    // The validator of the first response: a resume asks for the rest of
    // that exact object (If-Range), so two versions are never spliced.
    let mut validator: Option<reqwest::header::HeaderValue> = None;
    loop {
        let offset = sink.written();
        let mut req = with_auth(http.client.get(uri.clone()), auth);
        if offset > 0 {
            req = req.header(RANGE, format!("bytes={offset}-"));
            if let Some(v) = &validator {
                req = req.header(IF_RANGE, v.clone());
            }
        }
        let resp = match send_with_retry(req).await {
            Ok(r) => r,
            Err(e) if offset > 0 && resumes < MAX_RESUMES => {
                tracing::warn!(%uri, offset, error = %e, "resume request failed; retrying");
                resumes += 1;
                continue;
            }
            Err(e) => return Err(e),
        };
        if offset == 0 {
            if resp.status() != StatusCode::OK {
                return Err(FetchError::Status(resp.status().as_u16()));
            }
            expected = resp.content_length();
            // Only a strong ETag or a Last-Modified date may guard a resume.
            validator = resp
                .headers()
                .get(ETAG)
                .filter(|v| !v.as_bytes().starts_with(b"W/"))
                .or_else(|| resp.headers().get(LAST_MODIFIED))
                .cloned();
            can_resume = validator.is_some()
                && resp
                    .headers()
                    .get(ACCEPT_RANGES)
                    .is_some_and(|v| v.as_bytes() == b"bytes");
            if let Some(total) = expected {
                progress.set_total(total);
            }
        } else {
            let resumed_here = resp.status() == StatusCode::PARTIAL_CONTENT
                && resp
                    .headers()
                    .get(CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.starts_with(&format!("bytes {offset}-")));
            if !resumed_here {
                return Err(truncated(sink.written(), expected, resumes));
            }
        }
        let mut stream = resp.bytes_stream();
        let mut broke = None;
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(bytes) => {
                    let n = bytes.len() as u64;
                    // tmpfs writes are memory copies; keep them off the reactor anyway.
                    tokio::task::block_in_place(|| sink.write(bytes))
                        .map_err(FetchError::Write)?
                        .map_err(|o| FetchError::TooLarge(o.limit))?;
                    progress.advance(n);
                }
                Err(e) => {
                    broke = Some(describe(&e));
                    break;
                }
            }
        }
        let complete = match expected {
            Some(total) => sink.written() == total,
            None => broke.is_none(),
        };
        if complete {
            let (bytes, sha256) = tokio::task::block_in_place(|| sink.finish()).map_err(FetchError::Write)?;
            return Ok(Fetched { bytes, sha256, resumes });
        }
        if can_resume && resumes < MAX_RESUMES {
            tracing::warn!(%uri, got = sink.written(), ?expected, reason = ?broke, "body ended early; resuming with Range");
            resumes += 1;
            continue;
        }
        return Err(truncated(sink.written(), expected, resumes));
    }
}

/// Objects at least this large may be fetched as several concurrent ranges.
pub const RANGED_MIN: u64 = 128 << 20;

/// Fetches an object of `size` bytes (known from a listing or HEAD) as
/// `parts` concurrent `Range` requests, each written in place at
/// its offset, hashed in file order as the written prefix grows: one
/// connection's throughput (a CDN's per-connection cap) no longer bounds a
/// large file. Every part after the first carries `If-Range` with the first
/// answer's validator, so parts of two versions are never combined; a part
/// cut short resumes from where it stopped. `Ok(Err(sink))`: the server does
/// not serve ranges (nothing was written), fetch the file as one stream.
pub async fn fetch_ranged(
    http: &HttpSource,
    uri: &url::Url,
    auth: Option<&HeaderValue>,
    mut sink: HashingSink,
    size: u64,
    parts: u64,
    progress: &dyn Progress,
) -> Result<Result<Fetched, HashingSink>, FetchError> {
    http.check(uri)?;
    if size > sink.limit() {
        return Err(FetchError::TooLarge(sink.limit()));
    }
    let part_len = size.div_ceil(parts.max(1)).next_multiple_of(1 << 20);
    let parts: Vec<(u64, u64)> = (0..size.div_ceil(part_len))
        .map(|i| (i * part_len, ((i + 1) * part_len).min(size)))
        .collect();
    // The first part doubles as the probe: a 200 means no ranges.
    let (first_start, first_end) = parts[0];
    let first = send_with_retry(
        with_auth(http.client.get(uri.clone()), auth).header(RANGE, format!("bytes={first_start}-{}", first_end - 1)),
    )
    .await?;
    if first.status() == StatusCode::OK {
        return Ok(Err(sink));
    }
    if first.status() != StatusCode::PARTIAL_CONTENT {
        return Err(FetchError::Status(first.status().as_u16()));
    }
    let total = first
        .headers()
        .get(CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit_once('/'))
        .and_then(|(_, t)| t.parse::<u64>().ok());
    if total != Some(size) {
        return Err(FetchError::Unreachable(format!(
            "{uri}: the server says the object is {total:?} bytes, the listing said {size}; the object changed, try again"
        )));
    }
    let validator = first
        .headers()
        .get(ETAG)
        .filter(|v| !v.as_bytes().starts_with(b"W/"))
        .or_else(|| first.headers().get(LAST_MODIFIED))
        .cloned();
    if validator.is_none() && parts.len() > 1 {
        // Without a validator, parts could come from two versions.
        return Err(FetchError::Unreachable(format!(
            "{uri}: the server serves ranges without an ETag or Last-Modified, so parts cannot be tied to one version"
        )));
    }
    progress.set_total(size);
    let file = Arc::new(sink.file().try_clone().map_err(FetchError::Write)?);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, u64)>();
    let mut tasks = tokio::task::JoinSet::new();
    let mut first = Some(first);
    for (index, &(start, end)) in parts.iter().enumerate() {
        let part = RangePart {
            http: http.clone(),
            uri: uri.clone(),
            auth: auth.cloned(),
            validator: validator.clone(),
            file: file.clone(),
            index,
            start,
            end,
            events: tx.clone(),
        };
        let opened = if index == 0 { first.take() } else { None };
        tasks.spawn(part.run(opened));
    }
    drop(tx);
    // Hash the contiguous written prefix as it grows.
    let mut done = vec![0u64; parts.len()];
    let mut hashed = 0u64;
    while let Some((index, n)) = rx.recv().await {
        done[index] += n;
        progress.advance(n);
        let mut frontier = 0;
        for (i, &(start, end)) in parts.iter().enumerate() {
            frontier = start + done[i];
            if frontier < end {
                break;
            }
        }
        if frontier > hashed {
            let len = usize::try_from(frontier - hashed).map_err(|e| FetchError::Write(io::Error::other(e)))?;
            tokio::task::block_in_place(|| sink.staged(hashed, len)).map_err(FetchError::Write)?;
            hashed = frontier;
        }
    }
    let mut resumes = 0;
    while let Some(joined) = tasks.join_next().await {
        resumes += joined.map_err(|e| FetchError::Write(io::Error::other(e)))??;
    }
    if hashed != size {
        return Err(truncated(hashed, Some(size), resumes));
    }
    let (bytes, sha256) = tokio::task::block_in_place(|| sink.finish()).map_err(FetchError::Write)?;
    Ok(Ok(Fetched { bytes, sha256, resumes }))
}

/// One range of a [`fetch_ranged`] download.
struct RangePart {
    http: HttpSource,
    uri: url::Url,
    auth: Option<HeaderValue>,
    validator: Option<HeaderValue>,
    file: Arc<std::fs::File>,
    index: usize,
    start: u64,
    end: u64,
    /// `(part, bytes written)` as they land, for hashing and progress.
    events: tokio::sync::mpsc::UnboundedSender<(usize, u64)>,
}

impl RangePart {
    /// Writes the part at its offset; returns the resumptions it needed.
    async fn run(self, mut opened: Option<reqwest::Response>) -> Result<u32, FetchError> {
        use std::os::unix::fs::FileExt;
        let mut at = self.start;
        let mut resumes = 0;
        loop {
            let resp = match opened.take() {
                Some(r) => r,
                None => {
                    let mut req = with_auth(self.http.client.get(self.uri.clone()), self.auth.as_ref())
                        .header(RANGE, format!("bytes={at}-{}", self.end - 1));
                    if let Some(v) = &self.validator {
                        req = req.header(IF_RANGE, v.clone());
                    }
                    send_with_retry(req).await?
                }
            };
            let expected = format!("bytes {at}-{}/", self.end - 1);
            let exact = resp.status() == StatusCode::PARTIAL_CONTENT
                && resp
                    .headers()
                    .get(CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.starts_with(&expected));
            if !exact {
                // A 200 here means If-Range failed: the object changed.
                return Err(FetchError::Unreachable(format!(
                    "{}: range {at}-{} answered HTTP {} without that range; the object changed while it was read, try again",
                    self.uri,
                    self.end - 1,
                    resp.status().as_u16()
                )));
            }
            let mut stream = resp.bytes_stream();
            let mut broke = None;
            while let Some(chunk) = stream.next().await {
                match chunk {
                    Ok(bytes) => {
                        let n = bytes.len() as u64;
                        if at + n > self.end {
                            return Err(FetchError::TooLarge(self.end - self.start));
                        }
                        let file = self.file.clone();
                        tokio::task::block_in_place(|| file.write_all_at(&bytes, at)).map_err(FetchError::Write)?;
                        at += n;
                        // The receiver only stops when the download is abandoned.
                        let _ = self.events.send((self.index, n));
                    }
                    Err(e) => {
                        broke = Some(describe(&e));
                        break;
                    }
                }
            }
            if at == self.end {
                return Ok(resumes);
            }
            if resumes >= MAX_RESUMES {
                return Err(truncated(at - self.start, Some(self.end - self.start), resumes));
            }
            tracing::warn!(uri = %self.uri, part = self.index, at, reason = ?broke, "range ended early; resuming");
            resumes += 1;
        }
    }
}

/// A small document (an API answer) read whole, at most `limit` bytes:
/// `(status, headers, body)`. Error statuses are returned, not raised, so
/// the caller can read the server's explanation.
pub async fn get_document(
    http: &HttpSource,
    uri: &url::Url,
    auth: Option<&HeaderValue>,
    accept: Option<&HeaderValue>,
    limit: usize,
) -> Result<(StatusCode, reqwest::header::HeaderMap, Vec<u8>), FetchError> {
    http.check(uri)?;
    let mut req = with_auth(http.client.get(uri.clone()), auth);
    if let Some(accept) = accept {
        req = req.header(reqwest::header::ACCEPT, accept.clone());
    }
    let resp = send_with_retry(req).await?;
    let (status, headers) = (resp.status(), resp.headers().clone());
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| FetchError::Unreachable(describe(&e)))?;
        if body.len() + chunk.len() > limit {
            return Err(FetchError::TooLarge(limit as u64));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((status, headers, body))
}

/// `Authorization` on a request; reqwest drops it when a redirect leaves
/// the host (a hub's CDN never sees the token).
fn with_auth(req: reqwest::RequestBuilder, auth: Option<&HeaderValue>) -> reqwest::RequestBuilder {
    match auth {
        Some(v) => req.header(reqwest::header::AUTHORIZATION, v.clone()),
        None => req,
    }
}

fn truncated(got: u64, expected: Option<u64>, resumes: u32) -> FetchError {
    FetchError::Truncated {
        got,
        expected: expected.unwrap_or(0),
        resumes,
    }
}

async fn send_with_retry(req: reqwest::RequestBuilder) -> Result<reqwest::Response, FetchError> {
    let mut delay = Duration::from_millis(100);
    let mut attempt = 1;
    loop {
        let Some(this) = req.try_clone() else {
            return req.send().await.map_err(|e| failure(&e));
        };
        match this.send().await {
            Ok(resp) => return Ok(resp),
            // The resolver's refusal also reads as a connect error: not retried here.
            Err(e)
                if PolicyRefusal::find(&e).is_none()
                    && (e.is_connect() || e.is_timeout())
                    && attempt < CONNECT_ATTEMPTS =>
            {
                tracing::debug!(error = %describe(&e), attempt, "connect failed; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
                attempt += 1;
            }
            Err(e) => return Err(failure(&e)),
        }
    }
}

/// What a request that got no answer reads as: a policy decision (the
/// resolver's refusal, a refused redirect), else an unreachable source.
fn failure(e: &reqwest::Error) -> FetchError {
    match PolicyRefusal::find(e) {
        Some(r) if r.by_resolution => FetchError::RefusedByResolution(describe(e)),
        Some(_) => FetchError::Refused(describe(e)),
        None if e.is_redirect() => FetchError::Refused(describe(e)),
        None => FetchError::Unreachable(describe(e)),
    }
}

/// reqwest's top-level message hides the cause; join the chain.
fn describe(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let part = s.to_string();
        if !msg.contains(&part) {
            msg.push_str(": ");
            msg.push_str(&part);
        }
        cur = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;

    use super::*;
    use crate::source::policy::SourcePolicy;

    #[tokio::test]
    async fn a_name_that_resolves_to_a_refused_address_is_a_refusal_by_resolution() {
        let http = HttpSource::new(Arc::new(SourcePolicy::cluster(vec![], vec![]))).unwrap();
        // Nothing listens on port 9: only the policy can answer this fast.
        let by_name = url::Url::parse("http://localhost:9/model.safetensors").unwrap();
        let err = get_document(&http, &by_name, None, None, 1024).await.unwrap_err();
        assert!(
            matches!(&err, FetchError::RefusedByResolution(m) if m.contains("host localhost resolves to a refused address")),
            "{err:?}"
        );
        // An address written in the URL is refused before any lookup, for good.
        let literal = url::Url::parse("http://127.0.0.1:9/model.safetensors").unwrap();
        let err = get_document(&http, &literal, None, None, 1024).await.unwrap_err();
        assert!(matches!(err, FetchError::Refused(_)), "{err:?}");
    }
}
