//! The emulated kube-apiserver: an HTTP server on 127.0.0.1 serving the Kubernetes REST API
//! (discovery, CRUD, patch, watch, subresources) from in-memory storage, a garbage collector,
//! and fault injection.
//!
//! A request goes through `http` (injected faults), `routes` (the table of every endpoint,
//! the resource lookup and the audit record) and `handlers` (the verbs, on `ops`' storage);
//! `request` holds what they share, `protobuf` decodes kubectl's protobuf bodies.

pub mod audit;
mod faults;
mod handlers;
pub mod http;
pub mod meta;
pub mod openapi;
pub mod ops;
pub mod patch;
mod protobuf;
mod request;
pub mod resources;
mod routes;
pub mod selectors;
pub mod store;
pub mod table;
mod watch;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::logs::PodLogs;
pub use faults::Faults;
use ops::ApiState;

/// How many change events watches can resume from before `410 Gone`.
const HISTORY: usize = 100_000;

/// Errors of running the apiserver.
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    /// Could not listen on loopback.
    #[error("binding 127.0.0.1:0: {0}")]
    Bind(std::io::Error),
    /// A CRD given at start was refused.
    #[error("installing CRD: {0}")]
    InstallCrd(String),
}

/// A running apiserver.
#[derive(Debug)]
pub struct ApiServer {
    addr: SocketAddr,
    state: Arc<ApiState>,
    faults: Arc<Faults>,
    audit: Arc<audit::Audit>,
    server: JoinHandle<()>,
    gc: JoinHandle<()>,
    stop: tokio::sync::oneshot::Sender<()>,
}

impl ApiServer {
    /// Starts serving on 127.0.0.1 with a free port, with the given CRDs installed.
    pub async fn start(
        crds: &[serde_json::Value],
        logs: PodLogs,
    ) -> Result<ApiServer, ApiServerError> {
        let state = Arc::new(ApiState::new(HISTORY));
        if let Some(rt) = state.resolve("apiextensions.k8s.io", "v1", "customresourcedefinitions") {
            for crd in crds {
                state
                    .create(&rt, "", crd.clone())
                    .map_err(|e| ApiServerError::InstallCrd(e.message))?;
            }
        }
        let faults = Arc::new(Faults::new(state.clone()));
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .map_err(ApiServerError::Bind)?;
        let addr = listener.local_addr().map_err(ApiServerError::Bind)?;
        let audit = Arc::new(audit::Audit::default());
        let app = http::router(state.clone(), faults.clone(), logs, audit.clone());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
                let _ = stopped.await;
            });
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "apiserver stopped");
            }
        });
        let gc_state = state.clone();
        let gc = tokio::spawn(async move {
            loop {
                gc_state.gc.notified().await;
                gc_state.collect_garbage();
                // Coalesces bursts of deletions into one scan.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        Ok(ApiServer {
            addr,
            state,
            faults,
            audit,
            server,
            gc,
            stop,
        })
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Fault injection.
    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    /// The request audit log (off until enabled).
    pub fn audit(&self) -> &audit::Audit {
        &self.audit
    }

    /// Direct access to the storage and verbs (bypassing HTTP), for tests and the benchmark.
    pub fn state(&self) -> &Arc<ApiState> {
        &self.state
    }

    /// Stops serving: no new connections, idle keep-alive connections close, open watches
    /// end; connections still busy after a second are dropped.
    pub async fn shutdown(self) {
        let _ = self.stop.send(());
        self.state.restart();
        self.gc.abort();
        let mut server = self.server;
        if tokio::time::timeout(Duration::from_secs(1), &mut server)
            .await
            .is_err()
        {
            server.abort();
        }
    }
}
