//! Prometheus metrics and the `/healthz` endpoint, served on `--metrics-addr`
//! (off by default: several Fluid FUSE pods share a node's network).
//!
//! Metrics are process-wide (one FUSE session per process) and cheap to
//! update: counters are atomics. Gauges that describe state (memory budget,
//! reservations, inodes) are read when scraped, from a [`Snapshot`] the
//! server is handed a function for: this module knows nothing of the file
//! system's types, so the file system can use its counters without a cycle.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tracing::{info, warn};

use crate::store::{ObjectStore, StoreError};

/// The state that gauges and `/healthz` report, taken when scraped.
pub struct Snapshot {
    pub memory_used: u64,
    pub memory_limit: u64,
    /// Bytes held by reservations, by kind.
    pub reserved: Vec<(&'static str, u64)>,
    pub inodes: u64,
    /// Each mount's name and store.
    pub servers: Vec<(String, Arc<dyn ObjectStore>)>,
}

/// Takes a [`Snapshot`].
pub type SnapshotFn = Arc<dyn Fn() -> Snapshot + Send + Sync>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub operation: &'static str,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    pub operation: &'static str,
}

pub struct Metrics {
    pub s3_requests: Family<RequestLabels, Counter>,
    pub s3_latency: Family<OperationLabels, Histogram>,
    pub bytes_read: Counter,
    pub bytes_written: Counter,
    pub bytes_fetched: Counter,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub cache_evictions: Counter,
    pub disk_cache_hits: Counter,
    pub disk_cache_bytes: Gauge,
    pub passthrough_opens: Counter,
    pub prefetch_restarts: Counter,
    pub open_handles: Gauge,
    pub memory_used: Gauge,
    pub memory_limit: Gauge,
    pub uploads_failed: Counter,
    pub memory_reserved: Family<KindLabels, Gauge>,
    pub multipart_open: Gauge,
    pub inodes: Gauge,
    registry: Registry,
}

fn latency_histogram() -> Histogram {
    // 1 ms .. ~32 s
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 16))
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let mut registry = Registry::with_prefix("bucketfs");
        let m = Metrics {
            s3_requests: Family::default(),
            s3_latency: Family::new_with_constructor(latency_histogram),
            bytes_read: Counter::default(),
            bytes_written: Counter::default(),
            bytes_fetched: Counter::default(),
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            cache_evictions: Counter::default(),
            disk_cache_hits: Counter::default(),
            disk_cache_bytes: Gauge::default(),
            passthrough_opens: Counter::default(),
            prefetch_restarts: Counter::default(),
            open_handles: Gauge::default(),
            memory_used: Gauge::default(),
            memory_limit: Gauge::default(),
            uploads_failed: Counter::default(),
            memory_reserved: Family::default(),
            multipart_open: Gauge::default(),
            inodes: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register("s3_requests", "S3 requests by operation and outcome", m.s3_requests.clone());
        registry.register("s3_request_duration_seconds", "S3 request latency by operation", m.s3_latency.clone());
        registry.register("read_bytes", "Bytes returned to readers", m.bytes_read.clone());
        registry.register("written_bytes", "Bytes accepted from writers", m.bytes_written.clone());
        registry.register("fetched_bytes", "Bytes downloaded from S3 into the block cache", m.bytes_fetched.clone());
        registry.register("cache_hits", "Block reads served from memory", m.cache_hits.clone());
        registry.register("cache_misses", "Blocks fetched because they were not cached", m.cache_misses.clone());
        registry.register("cache_evictions", "Blocks evicted from the memory cache", m.cache_evictions.clone());
        registry.register("disk_cache_hits", "Blocks served from the disk cache", m.disk_cache_hits.clone());
        registry.register("disk_cache_size_bytes", "Bytes held by the disk cache", m.disk_cache_bytes.clone());
        registry.register(
            "passthrough_opens",
            "Opens answered in passthrough mode: the kernel reads the local file itself",
            m.passthrough_opens.clone(),
        );
        registry.register("prefetch_restarts", "Sequential streams broken by a seek", m.prefetch_restarts.clone());
        registry.register("open_handles", "Open file handles", m.open_handles.clone());
        registry.register(
            "memory_used_bytes",
            "Memory budget in use (cache, prefetch, write buffers)",
            m.memory_used.clone(),
        );
        registry.register("memory_limit_bytes", "Memory budget (--memory-limit)", m.memory_limit.clone());
        registry.register(
            "uploads_failed",
            "Uploads that failed and were reported to the application",
            m.uploads_failed.clone(),
        );
        registry.register(
            "memory_reserved_bytes",
            "Memory budget held by reservations (write buffers, parts in flight, disk-cache writes)",
            m.memory_reserved.clone(),
        );
        registry.register(
            "multipart_uploads_open",
            "Multipart uploads created and not yet completed or aborted",
            m.multipart_open.clone(),
        );
        registry.register("inodes", "Inodes known to the file system", m.inodes.clone());
        Metrics { registry, ..m }
    })
}

/// The `status` label for an S3 request's outcome.
pub fn outcome<T>(r: &Result<T, StoreError>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(StoreError::NotFound) => "not_found".into(),
        Err(StoreError::NoSuchBucket) => "no_such_bucket".into(),
        Err(StoreError::AccessDenied(_)) => "access_denied".into(),
        Err(StoreError::PreconditionFailed) => "precondition_failed".into(),
        Err(StoreError::InvalidRange) => "invalid_range".into(),
        Err(StoreError::Network(_)) => "network_error".into(),
        Err(StoreError::Server { status, .. }) => status.to_string(),
        Err(StoreError::Cancelled) => "cancelled".into(),
    }
}

/// Records one S3 request.
pub fn record_request<T>(operation: &'static str, started: Instant, r: &Result<T, StoreError>) {
    let m = metrics();
    m.s3_requests.get_or_create(&RequestLabels { operation, status: outcome(r) }).inc();
    m.s3_latency.get_or_create(&OperationLabels { operation }).observe(started.elapsed().as_secs_f64());
}

#[derive(Clone)]
struct AppState {
    snapshot: SnapshotFn,
    mountpoint: PathBuf,
}

/// Binds the metrics address now (so a bad address fails the start), and
/// returns a future that serves it.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

pub async fn serve(listener: tokio::net::TcpListener, snapshot: SnapshotFn, mountpoint: PathBuf) {
    let addr = listener.local_addr().ok();
    let app = Router::new()
        .route("/metrics", get(scrape))
        .route("/healthz", get(healthz))
        .with_state(AppState { snapshot, mountpoint });
    info!("metrics and health on http://{}", addr.map(|a| a.to_string()).unwrap_or_default());
    if let Err(e) = axum::serve(listener, app).await {
        warn!("the metrics server stopped: {e}");
    }
}

async fn scrape(State(state): State<AppState>) -> impl IntoResponse {
    let m = metrics();
    let snap = (state.snapshot)();
    m.memory_used.set(snap.memory_used as i64);
    m.memory_limit.set(snap.memory_limit as i64);
    for (kind, bytes) in snap.reserved {
        m.memory_reserved.get_or_create(&KindLabels { kind }).set(bytes as i64);
    }
    m.inodes.set(snap.inodes as i64);
    let mut body = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut body, &m.registry) {
        return (StatusCode::INTERNAL_SERVER_ERROR, [(header::CONTENT_TYPE, "text/plain")], e.to_string());
    }
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body)
}

/// 200 when the mount answers `stat` and every bucket answers a listing;
/// 503 otherwise, with the reasons.
async fn healthz(State(state): State<AppState>) -> impl IntoResponse {
    const TIMEOUT: Duration = Duration::from_secs(3);
    let path = state.mountpoint.clone();
    let stat = tokio::time::timeout(TIMEOUT, tokio::task::spawn_blocking(move || std::fs::metadata(&path).map(|_| ())));
    let mount = match stat.await {
        Ok(Ok(Ok(()))) => serde_json::json!({"ok": true}),
        Ok(Ok(Err(e))) => serde_json::json!({"ok": false, "error": e.to_string()}),
        _ => serde_json::json!({"ok": false, "error": "stat did not answer in time"}),
    };
    let mut all_ok = mount["ok"] == true;
    let mut servers = Vec::new();
    for (name, store) in (state.snapshot)().servers {
        let r = tokio::time::timeout(TIMEOUT, store.check_bucket()).await;
        let entry = match r {
            Ok(Ok(())) => {
                serde_json::json!({"mount": name, "source": store.describe(), "ok": true})
            }
            Ok(Err(e)) => {
                serde_json::json!({"mount": name, "source": store.describe(), "ok": false, "error": e.to_string()})
            }
            Err(_) => {
                serde_json::json!({"mount": name, "source": store.describe(), "ok": false, "error": "no answer in time"})
            }
        };
        all_ok &= entry["ok"] == true;
        servers.push(entry);
    }
    let body =
        serde_json::json!({"status": if all_ok { "ok" } else { "unhealthy" }, "mount": mount, "servers": servers});
    let code = if all_ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, [(header::CONTENT_TYPE, "application/json")], body.to_string())
}
