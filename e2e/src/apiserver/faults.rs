//! Faults injected into requests, for resilience tests, shaped like a real
//! API server's: 429 TooManyRequests with `Retry-After` (API Priority and
//! Fairness or max-in-flight shedding load), 500 InternalError, and 504
//! Timeout after a delay (the request filter's deadline), where a write may or
//! may not have been done. No 409s: those arise only from real conflicts.
//! Watches are not failed, but cut after a random time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rand::Rng;
use serde_json::json;

use super::error::ApiError;

/// What an injected fault looks like to the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// 429 with `Retry-After: 1` and `details.retryAfterSeconds`.
    TooManyRequests,
    /// 500 InternalError.
    InternalError,
    /// 504 Timeout after [`FaultConfig::timeout_after`]; half the writes
    /// that time out were done anyway (the answer is what was lost).
    Timeout,
}

impl FaultKind {
    pub const ALL: [FaultKind; 3] = [FaultKind::TooManyRequests, FaultKind::InternalError, FaultKind::Timeout];

    fn index(self) -> usize {
        match self {
            FaultKind::TooManyRequests => 0,
            FaultKind::InternalError => 1,
            FaultKind::Timeout => 2,
        }
    }
}

#[derive(Clone, Debug)]
pub struct FaultConfig {
    /// Fraction of non-watch resource requests answered with an injected fault.
    pub error_rate: f64,
    /// The kinds injected faults take, equally likely.
    pub kinds: Vec<FaultKind>,
    /// How long a timing-out request hangs before its 504.
    pub timeout_after: Duration,
    /// Watch streams end after a random time up to this long.
    pub cut_watches_within: Option<Duration>,
}

impl Default for FaultConfig {
    fn default() -> Self {
        FaultConfig {
            error_rate: 0.0,
            kinds: FaultKind::ALL.to_vec(),
            timeout_after: Duration::from_secs(1),
            cut_watches_within: None,
        }
    }
}

/// Shared fault settings and the count of faults injected so far, per kind.
#[derive(Clone, Default)]
pub struct Faults(Arc<Mutex<FaultConfig>>, Arc<[AtomicU64; 3]>);

impl Faults {
    pub fn set(&self, config: FaultConfig) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = config;
    }

    /// Requests answered with an injected error so far.
    pub fn injected(&self) -> u64 {
        self.1.iter().map(|n| n.load(Ordering::Relaxed)).sum()
    }

    /// Requests answered with an injected fault of this kind so far.
    pub fn injected_of(&self, kind: FaultKind) -> u64 {
        self.1[kind.index()].load(Ordering::Relaxed)
    }

    fn config(&self) -> FaultConfig {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn pick(&self) -> Option<(FaultKind, Duration)> {
        let c = self.config();
        if c.error_rate <= 0.0 || c.kinds.is_empty() {
            return None;
        }
        let mut rng = rand::thread_rng();
        if !rng.gen_bool(c.error_rate.min(1.0)) {
            return None;
        }
        let kind = c.kinds[rng.gen_range(0..c.kinds.len())];
        self.1[kind.index()].fetch_add(1, Ordering::Relaxed);
        Some((kind, c.timeout_after))
    }

    pub(super) fn watch_cut(&self) -> Option<Duration> {
        let within = self.config().cut_watches_within?;
        let ms = rand::thread_rng().gen_range(1..=within.as_millis().max(2) as u64);
        Some(Duration::from_millis(ms))
    }
}

/// Is this a request for resources (not discovery, health or logs), and not a watch?
fn faultable(req: &Request) -> bool {
    let segs: Vec<&str> = req.uri().path().split('/').filter(|s| !s.is_empty()).collect();
    let resource = match segs.first() {
        Some(&"api") => segs.len() >= 3,
        Some(&"apis") => segs.len() >= 4,
        _ => false,
    };
    let watch = req.uri().query().is_some_and(|q| {
        url::form_urlencoded::parse(q.as_bytes()).any(|(k, v)| k == "watch" && (v == "true" || v == "1"))
    });
    resource && !watch && segs.last() != Some(&"log")
}

fn status_response(e: &ApiError, extra_header: Option<(header::HeaderName, &'static str)>) -> Response {
    let code = StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        e.status().to_string(),
    )
        .into_response();
    if let Some((name, value)) = extra_header {
        resp.headers_mut().insert(name, header::HeaderValue::from_static(value));
    }
    resp
}

/// Middleware: answers a share of requests with an injected fault.
pub async fn inject(State(faults): State<Faults>, req: Request, next: Next) -> Response {
    if !faultable(&req) {
        return next.run(req).await;
    }
    let Some((kind, timeout_after)) = faults.pick() else {
        return next.run(req).await;
    };
    match kind {
        FaultKind::TooManyRequests => status_response(
            &ApiError::new(429, "TooManyRequests", "Too many requests, please try again later.")
                .with_details(json!({"retryAfterSeconds": 1})),
            Some((header::RETRY_AFTER, "1")),
        ),
        FaultKind::InternalError => status_response(
            &ApiError::new(500, "InternalError", "Internal error occurred: injected fault")
                .with_details(json!({"causes": [{"message": "injected fault"}]})),
            None,
        ),
        FaultKind::Timeout => {
            if req.method() != Method::GET && rand::thread_rng().gen_bool(0.5) {
                // The write is done; only its answer is lost.
                let _ = next.run(req).await;
            }
            tokio::time::sleep(timeout_after).await;
            status_response(
                &ApiError::new(
                    504,
                    "Timeout",
                    "Timeout: request did not complete within requested timeout - context deadline exceeded",
                )
                .with_details(json!({})),
                None,
            )
        }
    }
}
