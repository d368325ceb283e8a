//! A tenant's storefront on loopback, for tests: it receives loraplane's notifications and
//! verifies each one as a storefront's own code would verify a Stripe event (the
//! `Loraplane-Signature: t=…,v1=…` header is HMAC-SHA256 over `"{t}.{body}"` with the shared
//! secret, within five minutes). It can be taken down (answering 503) and brought back.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use serde_json::Value;
use sha2::Sha256;

use crate::SimError;

/// The header notifications are signed in.
pub const SIGNATURE_HEADER: &str = "loraplane-signature";

#[derive(Default)]
struct State {
    received: Vec<Value>,
    raw: Vec<(String, Vec<u8>)>,
    at: Vec<std::time::Instant>,
    attempts: usize,
    down: bool,
    refused: Vec<String>,
}

/// A running storefront.
pub struct Storefront {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Storefront {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Checks a `t=…,v1=…` header against `body` as Stripe's libraries do; the reason when not.
pub fn verify(secret: &[u8], header: &str, body: &[u8], now: i64) -> Result<(), String> {
    let mut t = None;
    let mut v1 = Vec::new();
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", v)) => t = v.parse::<i64>().ok(),
            Some(("v1", v)) => v1.push(v.to_string()),
            _ => {}
        }
    }
    let t = t.ok_or("no timestamp in the signature header")?;
    if (now - t).abs() > 300 {
        return Err(format!("timestamp {t} is outside the tolerance"));
    }
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).map_err(|e| e.to_string())?;
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    let expected = hex::encode(mac.finalize().into_bytes());
    if v1.contains(&expected) {
        Ok(())
    } else {
        Err("no v1 signature matches the body".into())
    }
}

impl Storefront {
    /// Starts on a free loopback port, verifying with `secret`.
    pub async fn start(secret: &[u8]) -> Result<Storefront, SimError> {
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        let secret = secret.to_vec();
        let (addr, server) =
            crate::listen(move |req| receive(shared.clone(), secret.clone(), req)).await?;
        Ok(Storefront {
            addr,
            state,
            server,
        })
    }

    /// The webhook endpoint to configure.
    pub fn url(&self) -> String {
        format!("http://{}/webhooks/loraplane", self.addr)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Verified events accepted (answered 200), in the order they arrived, redeliveries included.
    pub fn events(&self) -> Vec<Value> {
        self.state().received.clone()
    }

    /// Verified events with the instant each arrived, in arrival order.
    pub fn timed(&self) -> Vec<(std::time::Instant, Value)> {
        let st = self.state();
        st.at
            .iter()
            .copied()
            .zip(st.received.iter().cloned())
            .collect()
    }

    /// Accepted deliveries exactly as they came: the signature header and the body.
    pub fn raw(&self) -> Vec<(String, Vec<u8>)> {
        self.state().raw.clone()
    }

    /// Runs the official `stripe` Python package's `stripe.Webhook.construct_event` on
    /// `deliveries` (signature header, body), as a storefront's own code would; the event
    /// types it read, or its error. The interpreter is `.tools/venv/bin/python`, which
    /// `make bootstrap` installs with the package.
    pub fn verify_with_stripe_package(
        deliveries: &[(String, Vec<u8>)],
        secret: &[u8],
    ) -> Result<Vec<String>, String> {
        use std::io::Write;
        let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let python = here.join("../../.tools/venv/bin/python");
        if !python.exists() {
            return Err(format!(
                "{} is missing: run `make bootstrap` (it installs the `stripe` package)",
                python.display()
            ));
        }
        let mut child = std::process::Command::new(&python)
            .arg(here.join("verify_with_stripe.py"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("running {}: {e}", python.display()))?;
        let mut input = String::new();
        for (header, body) in deliveries {
            let line = serde_json::json!({"secret": String::from_utf8_lossy(secret),
                "header": header, "payload": String::from_utf8_lossy(body)});
            input.push_str(&line.to_string());
            input.push('\n');
        }
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(input.as_bytes())
                .map_err(|e| format!("writing to the verifier: {e}"))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| format!("running the verifier: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).to_string());
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect())
    }

    /// Deliveries tried, including those answered 503 while down.
    pub fn attempts(&self) -> usize {
        self.state().attempts
    }

    /// Deliveries refused for a bad signature or body, each with the reason.
    pub fn refused(&self) -> Vec<String> {
        self.state().refused.clone()
    }

    /// Takes the storefront down (every delivery answered 503) or brings it back.
    pub fn set_down(&self, down: bool) {
        self.state().down = down;
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

async fn receive(
    state: Arc<Mutex<State>>,
    secret: Vec<u8>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let header = req
        .headers()
        .get(SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
    st.attempts += 1;
    let answer = |code: StatusCode| {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = code;
        Ok(r)
    };
    if st.down {
        return answer(StatusCode::SERVICE_UNAVAILABLE);
    }
    if let Err(why) = verify(&secret, &header, &body, now()) {
        st.refused.push(why);
        return answer(StatusCode::BAD_REQUEST);
    }
    match serde_json::from_slice::<Value>(&body) {
        Ok(event) => {
            st.received.push(event);
            st.raw.push((header, body.to_vec()));
            st.at.push(std::time::Instant::now());
            answer(StatusCode::OK)
        }
        Err(e) => {
            st.refused.push(format!("not JSON: {e}"));
            answer(StatusCode::BAD_REQUEST)
        }
    }
}
