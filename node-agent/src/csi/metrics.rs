//! Prometheus metrics (`zerocopy_*`) and the `/metrics`, `/healthz`,
//! `/readyz` endpoints.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use prometheus::{Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

use super::ledger::Ledger;
use crate::layout::VolumeRoot;

/// Every metric the agent exports.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// NodePublishVolume calls by result (ok, invalid, not_found, unavailable, aborted, failed, internal).
    pub publish_total: IntCounterVec,
    /// NodeUnpublishVolume calls by result.
    pub unpublish_total: IntCounterVec,
    /// Latency of NodePublishVolume / NodeUnpublishVolume, by operation.
    pub csi_seconds: HistogramVec,
    /// Bytes written by fills, by wrapper.
    pub fill_bytes_total: IntCounterVec,
    /// Fill durations, by result.
    pub fill_seconds: HistogramVec,
    /// Times a collection pass kept a generation nothing wants because
    /// processes still map or hold its files, by wrapper.
    pub gc_kept_total: IntCounterVec,
    /// 1 when a tmpfs this agent mounts `huge=within_size` gets huge pages;
    /// 0 when the kernel grants none or the agent mounts no tmpfs.
    pub tmpfs_huge_pages: prometheus::IntGauge,
    active_mounts: IntGaugeVec,
    bytes_resident: IntGaugeVec,
    bytes_saved: IntGaugeVec,
}

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let publish_total = IntCounterVec::new(
            Opts::new("zerocopy_csi_publish_total", "NodePublishVolume calls by result"),
            &["result"],
        )?;
        let unpublish_total = IntCounterVec::new(
            Opts::new("zerocopy_csi_unpublish_total", "NodeUnpublishVolume calls by result"),
            &["result"],
        )?;
        let csi_seconds = HistogramVec::new(
            HistogramOpts::new("zerocopy_csi_operation_seconds", "Latency of CSI node operations").buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0,
            ]),
            &["operation"],
        )?;
        let fill_bytes_total = IntCounterVec::new(
            Opts::new("zerocopy_fill_bytes_total", "Bytes written by fills"),
            &["namespace", "wrapper"],
        )?;
        let fill_seconds = HistogramVec::new(
            HistogramOpts::new("zerocopy_fill_seconds", "Duration of generation fills")
                .buckets(prometheus::exponential_buckets(0.01, 4.0, 10)?),
            &["result"],
        )?;
        let active_mounts = IntGaugeVec::new(
            Opts::new("zerocopy_active_mounts", "Pod mounts per wrapper"),
            &["namespace", "wrapper"],
        )?;
        let bytes_resident = IntGaugeVec::new(
            Opts::new(
                "zerocopy_bytes_resident",
                "Bytes of complete generations held in memory",
            ),
            &["namespace", "wrapper"],
        )?;
        let bytes_saved = IntGaugeVec::new(
            Opts::new(
                "zerocopy_bytes_saved",
                "Bytes the mounts would have cost as private copies: (mounts - 1) x generation bytes",
            ),
            &["namespace", "wrapper"],
        )?;
        let gc_kept_total = IntCounterVec::new(
            Opts::new(
                "zerocopy_gc_kept_total",
                "Collection passes that kept an unwanted generation because processes still map or hold it",
            ),
            &["namespace", "wrapper"],
        )?;
        let tmpfs_huge_pages = prometheus::IntGauge::new(
            "zerocopy_node_tmpfs_huge_pages",
            "1 when this node's kernel gives the agent's tmpfs mounts huge pages (memory.hugePages), else 0",
        )?;
        for c in [&publish_total, &unpublish_total, &fill_bytes_total, &gc_kept_total] {
            registry.register(Box::new(c.clone()))?;
        }
        registry.register(Box::new(csi_seconds.clone()))?;
        registry.register(Box::new(fill_seconds.clone()))?;
        registry.register(Box::new(tmpfs_huge_pages.clone()))?;
        for g in [&active_mounts, &bytes_resident, &bytes_saved] {
            registry.register(Box::new(g.clone()))?;
        }
        Ok(Self {
            registry,
            tmpfs_huge_pages,
            publish_total,
            unpublish_total,
            csi_seconds,
            fill_bytes_total,
            fill_seconds,
            gc_kept_total,
            active_mounts,
            bytes_resident,
            bytes_saved,
        })
    }

    /// Recomputes the gauges from the volume root and the ledger.
    pub fn refresh(&self, root: &VolumeRoot, ledger: &Ledger) {
        let Ok(generations) = root.generations() else { return };
        let publications = ledger.all();
        let mut resident: BTreeMap<(String, String), i64> = BTreeMap::new();
        let mut mounts: BTreeMap<(String, String), i64> = BTreeMap::new();
        let mut saved: BTreeMap<(String, String), i64> = BTreeMap::new();
        for g in &generations {
            let Some(m) = &g.manifest else { continue };
            let key = (g.namespace.clone(), g.name.clone());
            *resident.entry(key.clone()).or_default() += m.total_bytes as i64;
            let n = publications
                .iter()
                .filter(|p| p.namespace == g.namespace && p.name == g.name && p.generation == g.generation)
                .count() as i64;
            *mounts.entry(key.clone()).or_default() += n;
            *saved.entry(key).or_default() += (n - 1).max(0) * m.total_bytes as i64;
        }
        for g in [&self.active_mounts, &self.bytes_resident, &self.bytes_saved] {
            g.reset();
        }
        for ((ns, name), v) in resident {
            self.bytes_resident
                .with_label_values(&[ns.as_str(), name.as_str()])
                .set(v);
        }
        for ((ns, name), v) in mounts {
            self.active_mounts
                .with_label_values(&[ns.as_str(), name.as_str()])
                .set(v);
        }
        for ((ns, name), v) in saved {
            self.bytes_saved.with_label_values(&[ns.as_str(), name.as_str()]).set(v);
        }
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` until the task is dropped.
pub async fn serve(
    addr: SocketAddr,
    metrics: Metrics,
    root: VolumeRoot,
    ledger: Arc<Ledger>,
    ready: Arc<AtomicBool>,
) -> std::io::Result<()> {
    use axum::http::StatusCode;
    use axum::routing::get;

    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let (metrics, root, ledger) = (metrics.clone(), root.clone(), ledger.clone());
                async move {
                    metrics.refresh(&root, &ledger);
                    metrics.render()
                }
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.clone();
                async move {
                    if ready.load(Ordering::SeqCst) {
                        (StatusCode::OK, "ready")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "starting")
                    }
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving metrics");
    axum::serve(listener, app).await
}
