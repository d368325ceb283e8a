//! Fault injection on demand: an error rate on writes (optionally aimed at one client),
//! added latency on every request, the bookmark interval of watches, and an apiserver restart
//! that expires watch history.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use super::meta;
use super::ops::ApiState;

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
    pub(super) fn new(state: Arc<ApiState>) -> Faults {
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
    pub(super) fn decide(&self, write: bool, user_agent: Option<&str>) -> (Duration, Option<u16>) {
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

    pub(super) fn bookmark_interval(&self) -> Duration {
        self.config().bookmark_interval
    }
}
