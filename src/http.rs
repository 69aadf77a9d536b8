//! `/metrics` (Prometheus text), `/healthz` (alive and not stalled), `/readyz` (model loaded, Redis
//! reachable, partitions assigned) on one port.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::worker::Health;

#[derive(Clone)]
struct AppState {
    metrics: Metrics,
    health: Arc<Health>,
}

async fn metrics_text(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

/// 200 while the worker makes progress; 503 once input has been pending with no progress for
/// `http.stall_timeout_secs` (a stuck worker: the orchestrator restarts it).
async fn healthz(State(s): State<AppState>) -> (StatusCode, String) {
    match s.health.stalled_ms(crate::worker::chrono_now_ms()) {
        None => (StatusCode::OK, "ok\n".into()),
        Some(ms) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "stalled: input pending and no progress for {} s\n",
                ms / 1000
            ),
        ),
    }
}

async fn readyz(State(s): State<AppState>) -> (StatusCode, String) {
    use std::sync::atomic::Ordering::Relaxed;
    let h = &s.health;
    let body = format!(
        "model_loaded={} redis_reachable={} partitions_assigned={}\n",
        h.model_loaded.load(Relaxed),
        h.redis_ok.load(Relaxed),
        h.assigned.load(Relaxed)
    );
    if h.ready() {
        (StatusCode::OK, body)
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, body)
    }
}

/// Binds `addr` and serves until `shutdown`. Returns the bound address (port 0 picks one).
pub async fn serve(
    addr: SocketAddr,
    metrics: Metrics,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AppState { metrics, health });
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        let res = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = res {
            tracing::error!(error = %e, "http server failed");
        }
    });
    Ok(bound)
}
