//! The HTTP endpoints of the operator: `/metrics` (Prometheus text format), `/healthz` (the
//! process answers) and `/readyz` (the CRD is served and the replica takes part in leader
//! election; a standby is ready too, it just does not reconcile).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::sync::watch;

use crate::controller::Health;
use crate::metrics::Metrics;

/// Why the server stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The address could not be bound.
    #[error("could not listen on {0}: {1}")]
    Bind(SocketAddr, #[source] std::io::Error),
    /// Serving failed.
    #[error("metrics server failed: {0}")]
    Serve(#[source] std::io::Error),
}

#[derive(Clone)]
struct AppState {
    metrics: Metrics,
    health: Arc<Health>,
}

/// The router, separate from binding so tests can drive it.
pub fn router(metrics: Metrics, health: Arc<Health>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(s): State<AppState>| async move { s.metrics.render() }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(s): State<AppState>| async move {
                if s.health.ready.load(Ordering::SeqCst) {
                    (StatusCode::OK, "ready")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "waiting for the CRD")
                }
            }),
        )
        .with_state(AppState { metrics, health })
}

/// Binds `addr` and serves until `shutdown` fires. Returns the bound address through `bound`.
pub async fn serve(
    addr: SocketAddr,
    metrics: Metrics,
    health: Arc<Health>,
    mut shutdown: watch::Receiver<bool>,
    bound: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> Result<(), ServerError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| ServerError::Bind(addr, e))?;
    if let Some(tx) = bound {
        let _ = tx.send(listener.local_addr().unwrap_or(addr));
    }
    axum::serve(listener, router(metrics, health))
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|s| *s).await;
        })
        .await
        .map_err(ServerError::Serve)
}
