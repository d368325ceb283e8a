//! The emulated kube-apiserver: an HTTP server on 127.0.0.1 serving the Kubernetes REST API
//! (discovery, CRUD, patch, watch, subresources) from in-memory storage, a garbage collector,
//! and fault injection.

pub mod audit;
pub mod http;
pub mod meta;
pub mod openapi;
pub mod ops;
pub mod patch;
pub mod resources;
pub mod selectors;
pub mod store;
pub mod table;
mod watch;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::logs::PodLogs;
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

/// Fault settings, read by every request.
#[derive(Debug, Clone)]
struct FaultConfig {
    error_rate: f64,
    error_codes: Vec<u16>,
    latency: Duration,
    bookmark_interval: Duration,
    injected: u64,
    /// When set, only requests with this User-Agent get injected errors.
    target_agent: Option<String>,
}

impl Default for FaultConfig {
    fn default() -> Self {
        FaultConfig {
            error_rate: 0.0,
            error_codes: vec![500, 429, 409],
            latency: Duration::ZERO,
            bookmark_interval: Duration::from_secs(1),
            injected: 0,
            target_agent: None,
        }
    }
}

/// Faults on demand: an error rate on writes, added latency on every request, and an
/// apiserver restart that expires watch history.
#[derive(Debug)]
pub struct Faults {
    config: Mutex<FaultConfig>,
    state: Arc<ApiState>,
}

impl Faults {
    fn new(state: Arc<ApiState>) -> Faults {
        Faults {
            config: Mutex::new(FaultConfig::default()),
            state,
        }
    }

    fn config(&self) -> std::sync::MutexGuard<'_, FaultConfig> {
        self.config.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Fails this fraction (0.0–1.0) of writes (POST, PUT, PATCH, DELETE) with one of the
    /// error codes (default 500, 429 with `Retry-After: 1`, 409 Conflict), picked at random.
    pub fn set_error_rate(&self, rate: f64) {
        self.config().error_rate = rate.clamp(0.0, 1.0);
    }

    /// Aims injected errors at one client: only requests whose User-Agent is `agent` fail
    /// (`None`: every writer). Lets a test fault the component under test while the simulated
    /// kubelets, which do not retry a lost status write, keep working.
    pub fn set_error_target(&self, agent: Option<&str>) {
        self.config().target_agent = agent.map(str::to_string);
    }

    /// Which codes injected errors use (any of 500, 503, 429, 409).
    pub fn set_error_codes(&self, codes: &[u16]) {
        self.config().error_codes = codes.to_vec();
    }

    /// Delays every request by this much.
    pub fn set_latency(&self, latency: Duration) {
        self.config().latency = latency;
    }

    /// How often watches that asked for bookmarks get one (default 1 s; a real apiserver
    /// sends one about every minute).
    pub fn set_bookmark_interval(&self, interval: Duration) {
        self.config().bookmark_interval = interval.max(Duration::from_millis(10));
    }

    /// Simulates an apiserver restart: open watches end and the watch history is forgotten, so
    /// resuming from a resourceVersion before the restart gets `410 Gone`.
    pub fn restart_apiserver(&self) {
        self.state.restart();
    }

    /// Removes the error rate, its target and the latency.
    pub fn clear(&self) {
        let mut c = self.config();
        c.error_rate = 0.0;
        c.target_agent = None;
        c.latency = Duration::ZERO;
    }

    /// How many errors were injected so far.
    pub fn injected_errors(&self) -> u64 {
        self.config().injected
    }

    /// The delay to add to a request, and the error code to fail a write with, if any.
    fn decide(&self, write: bool, user_agent: Option<&str>) -> (Duration, Option<u16>) {
        let mut c = self.config();
        let latency = c.latency;
        if !write || c.error_rate <= 0.0 || c.error_codes.is_empty() {
            return (latency, None);
        }
        if c.target_agent
            .as_deref()
            .is_some_and(|t| Some(t) != user_agent)
        {
            return (latency, None);
        }
        let r = meta::random_u64();
        let roll = (r >> 11) as f64 / (1u64 << 53) as f64;
        if roll >= c.error_rate {
            return (latency, None);
        }
        c.injected += 1;
        let code = c.error_codes[(r % c.error_codes.len() as u64) as usize];
        (latency, Some(code))
    }

    fn bookmark_interval(&self) -> Duration {
        self.config().bookmark_interval
    }
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
