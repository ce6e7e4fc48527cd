//! Prometheus metrics (`zerocopy_operator_*`) and the `/metrics`, `/healthz`,
//! `/readyz` endpoints.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::routing::get;
use prometheus::{Encoder, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub reconciles: IntCounterVec,
    pub reconcile_seconds: HistogramVec,
    pub writes: IntCounterVec,
    pub wrappers: IntGaugeVec,
    pub leader: IntGauge,
    /// Caches synced and (when electing) this replica leads or stands by.
    pub ready: Arc<AtomicBool>,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let reconciles = IntCounterVec::new(
            Opts::new(
                "zerocopy_operator_reconciles_total",
                "Reconciles by controller and result",
            ),
            &["controller", "result"],
        )?;
        let reconcile_seconds = HistogramVec::new(
            prometheus::HistogramOpts::new("zerocopy_operator_reconcile_seconds", "Reconcile duration")
                .buckets(vec![0.001, 0.005, 0.02, 0.1, 0.5, 2.0]),
            &["controller"],
        )?;
        let writes = IntCounterVec::new(
            Opts::new("zerocopy_operator_writes_total", "API writes by object kind and verb"),
            &["kind", "verb"],
        )?;
        let wrappers = IntGaugeVec::new(
            Opts::new("zerocopy_operator_wrappers", "ModelWrappers by phase"),
            &["phase"],
        )?;
        let leader = IntGauge::new(
            "zerocopy_operator_leader",
            "1 while this replica holds the leader lease",
        )?;
        registry.register(Box::new(reconciles.clone()))?;
        registry.register(Box::new(reconcile_seconds.clone()))?;
        registry.register(Box::new(writes.clone()))?;
        registry.register(Box::new(wrappers.clone()))?;
        registry.register(Box::new(leader.clone()))?;
        Ok(Metrics {
            registry,
            reconciles,
            reconcile_seconds,
            writes,
            wrappers,
            leader,
            ready: Arc::default(),
        })
    }

    pub fn write(&self, kind: &str, verb: &str) {
        self.writes.with_label_values(&[kind, verb]).inc();
    }

    fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }
}

pub async fn serve(addr: SocketAddr, metrics: Metrics) -> std::io::Result<()> {
    let m = metrics.clone();
    let ready = metrics.ready.clone();
    let app = axum::Router::new()
        .route("/metrics", get(move || async move { m.render() }))
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || async move {
                if ready.load(Ordering::SeqCst) {
                    (axum::http::StatusCode::OK, "ready")
                } else {
                    (axum::http::StatusCode::SERVICE_UNAVAILABLE, "caches not synced")
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app).await
}
