//! `http(s)://` sources: streamed with bounded memory, resumed with `Range`
//! when the connection drops and the server supports it.

use std::time::Duration;

use futures_util::StreamExt;
use reqwest::header::{ACCEPT_RANGES, CONTENT_RANGE, RANGE};
use reqwest::StatusCode;

use super::sink::HashingSink;
use super::{FetchError, Fetched, Progress};

/// Resumptions of one body before it is declared truncated.
const MAX_RESUMES: u32 = 3;
/// Attempts to connect before the source is declared unreachable.
const CONNECT_ATTEMPTS: u32 = 3;

/// Builds the client every HTTP source shares (rustls, no proxy magic).
pub fn client() -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(60))
        .user_agent(concat!("zerocopy-node-agent/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// The announced size, from a HEAD request; `None` when the server does not say.
pub async fn size(client: &reqwest::Client, uri: &url::Url) -> Result<Option<u64>, FetchError> {
    let resp = send_with_retry(client.head(uri.clone())).await?;
    if !resp.status().is_success() {
        return Err(FetchError::Status(resp.status().as_u16()));
    }
    Ok(resp
        .headers()
        .get(reqwest::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok()))
}

/// Streams the body into `sink`.
pub async fn fetch(
    client: &reqwest::Client,
    uri: &url::Url,
    mut sink: HashingSink,
    progress: &dyn Progress,
) -> Result<Fetched, FetchError> {
    let mut resumes = 0u32;
    let mut expected: Option<u64> = None;
    let mut can_resume = false;
    loop {
        let offset = sink.written();
        let mut req = client.get(uri.clone());
        if offset > 0 {
            req = req.header(RANGE, format!("bytes={offset}-"));
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
            can_resume = resp
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
            return req.send().await.map_err(|e| FetchError::Unreachable(describe(&e)));
        };
        match this.send().await {
            Ok(resp) => return Ok(resp),
            Err(e) if (e.is_connect() || e.is_timeout()) && attempt < CONNECT_ATTEMPTS => {
                tracing::debug!(error = %describe(&e), attempt, "connect failed; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
                attempt += 1;
            }
            Err(e) => return Err(FetchError::Unreachable(describe(&e))),
        }
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
