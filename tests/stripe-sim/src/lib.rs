//! Stripe's Refunds API on loopback, for tests: nobody can run Stripe here, so this server
//! checks each request the way Stripe's API reference describes it and answers as Stripe does.
//!
//! - `POST /v1/refunds` only, `Authorization: Bearer <secret key>` ([`SECRET_KEY`]), a
//!   `application/x-www-form-urlencoded` body with `payment_intent` (or `charge`), optional
//!   `amount`, `reason` (`duplicate`, `fraudulent`, `requested_by_customer`) and
//!   `metadata[...]`; any other parameter is refused (`parameter_unknown`).
//! - `Idempotency-Key`: a repeated key with the same parameters replays the first answer; with
//!   other parameters it is an `idempotency_error`.
//! - A payment refunded before is refused with `charge_already_refunded`.
//! - On demand, the next requests fail with a 500 `api_error`, or are acted on and answered
//!   late.
//!
//! Every refused request is kept with the reason, so a test can insist there were none.
//!
//! [`storefront::Storefront`] is the other side: a storefront receiving our signed
//! notifications.

pub mod storefront;

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

/// The secret key requests must carry.
pub const SECRET_KEY: &str = "sk_test_loraplane_stripe_sim";

/// Why the simulator could not start.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// No loopback port.
    #[error("binding the Stripe simulator to loopback: {0}")]
    Bind(std::io::Error),
}

/// One refund Stripe made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refund {
    /// `re_…`.
    pub id: String,
    /// The payment refunded.
    pub payment_intent: String,
    /// `metadata[...]` as sent.
    pub metadata: BTreeMap<String, String>,
    /// The request's `Idempotency-Key`, if any.
    pub idempotency_key: Option<String>,
}

/// What an idempotency key was first used with, and the answer it got.
type Reply = (BTreeMap<String, String>, (StatusCode, Value));

#[derive(Default)]
struct State {
    refunds: Vec<Refund>,
    /// Idempotency key → (the parameters, the answer).
    replies: HashMap<String, Reply>,
    requests: usize,
    fail_next: usize,
    delay: Option<Duration>,
    refused: Vec<String>,
}

/// A running simulator.
pub struct StripeSim {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for StripeSim {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl StripeSim {
    /// Starts on a free loopback port.
    pub async fn start() -> Result<StripeSim, SimError> {
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        let (addr, server) = listen(move |req| serve(shared.clone(), req)).await?;
        Ok(StripeSim {
            addr,
            state,
            server,
        })
    }

    /// The API base URL (`https://api.stripe.com` in production).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The refunds made, oldest first.
    pub fn refunds(&self) -> Vec<Refund> {
        self.state().refunds.clone()
    }

    /// Requests received, including failed and refused ones.
    pub fn requests(&self) -> usize {
        self.state().requests
    }

    /// Requests refused as malformed, each with the reason.
    pub fn refused(&self) -> Vec<String> {
        self.state().refused.clone()
    }

    /// Answers the next `n` requests with a 500 `api_error`, making no refund.
    pub fn fail_next(&self, n: usize) {
        self.state().fail_next = n;
    }

    /// Answers every request this much later, after acting on it (`None`: at once).
    pub fn delay(&self, d: Option<Duration>) {
        self.state().delay = d;
    }
}

fn error(status: StatusCode, kind: &str, code: &str, message: &str) -> (StatusCode, Value) {
    (
        status,
        json!({"error": {"type": kind, "code": code, "message": message}}),
    )
}

/// Serves HTTP/1.1 on a free loopback port with `handle`; the address and the server task.
pub(crate) async fn listen<F, Fut>(
    handle: F,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), SimError>
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(SimError::Bind)?;
    let addr = listener.local_addr().map_err(SimError::Bind)?;
    let server = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let handle = handle.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(handle);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok((addr, server))
}

async fn serve(
    state: Arc<Mutex<State>>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let delay = state.lock().map(|s| s.delay).unwrap_or(None);
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let (status, value) = {
        let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
        s.requests += 1;
        answer(&mut s, &parts, &body)
    };
    // Late, not lost: the request has taken effect when its answer is held back, as when
    // Stripe refunds but the caller gives up waiting.
    if let Some(d) = delay {
        tokio::time::sleep(d).await;
    }
    let mut resp = Response::new(Full::new(Bytes::from(value.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

fn refuse(
    s: &mut State,
    status: StatusCode,
    kind: &str,
    code: &str,
    why: String,
) -> (StatusCode, Value) {
    s.refused.push(why.clone());
    error(status, kind, code, &why)
}

fn answer(s: &mut State, parts: &hyper::http::request::Parts, body: &[u8]) -> (StatusCode, Value) {
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    if parts.method != hyper::Method::POST || parts.uri.path() != "/v1/refunds" {
        let why = format!(
            "unrecognized request URL ({} {})",
            parts.method,
            parts.uri.path()
        );
        return refuse(
            s,
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "resource_missing",
            why,
        );
    }
    if header("authorization").as_deref() != Some(&format!("Bearer {SECRET_KEY}")) {
        let why = "invalid API key provided".to_string();
        return refuse(
            s,
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "api_key_invalid",
            why,
        );
    }
    if header("content-type").as_deref() != Some("application/x-www-form-urlencoded") {
        let why = "the body must be application/x-www-form-urlencoded".to_string();
        return refuse(
            s,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "parameter_invalid",
            why,
        );
    }
    let params = match parse_form(body) {
        Ok(p) => p,
        Err(why) => {
            return refuse(
                s,
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "parameter_invalid",
                why,
            );
        }
    };
    for key in params.keys() {
        let known = matches!(
            key.as_str(),
            "payment_intent" | "charge" | "amount" | "reason"
        ) || (key.starts_with("metadata[") && key.ends_with(']') && key.len() > 10);
        if !known {
            let why = format!("received unknown parameter: {key}");
            return refuse(
                s,
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "parameter_unknown",
                why,
            );
        }
    }
    if let Some(r) = params.get("reason")
        && !matches!(
            r.as_str(),
            "duplicate" | "fraudulent" | "requested_by_customer"
        )
    {
        let why = format!("invalid reason {r:?}");
        return refuse(
            s,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "parameter_invalid",
            why,
        );
    }
    let Some(pi) = params
        .get("payment_intent")
        .or(params.get("charge"))
        .cloned()
    else {
        let why = "one of payment_intent or charge is required".to_string();
        return refuse(
            s,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "parameter_missing",
            why,
        );
    };
    let key = header("idempotency-key");
    if let Some(k) = &key
        && let Some((sent, reply)) = s.replies.get(k)
    {
        if sent != &params {
            let why = "an idempotency key was reused with other parameters".to_string();
            return refuse(
                s,
                StatusCode::BAD_REQUEST,
                "idempotency_error",
                "idempotency_key_in_use",
                why,
            );
        }
        return reply.clone();
    }
    // A failure on demand is Stripe's own trouble: no refund, and nothing remembered for the key.
    if s.fail_next > 0 {
        s.fail_next -= 1;
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "api_error",
            "internal",
            "simulated outage",
        );
    }
    let reply = if s.refunds.iter().any(|r| r.payment_intent == pi) {
        error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "charge_already_refunded",
            "this payment has already been refunded",
        )
    } else {
        let metadata: BTreeMap<String, String> = params
            .iter()
            .filter_map(|(k, v)| {
                let inner = k.strip_prefix("metadata[")?.strip_suffix(']')?;
                Some((inner.to_string(), v.clone()))
            })
            .collect();
        let refund = Refund {
            id: format!("re_sim_{}", s.refunds.len() + 1),
            payment_intent: pi.clone(),
            metadata: metadata.clone(),
            idempotency_key: key.clone(),
        };
        let body = json!({"id": refund.id, "object": "refund", "status": "succeeded",
            "payment_intent": pi, "metadata": metadata});
        s.refunds.push(refund);
        (StatusCode::OK, body)
    };
    if let Some(k) = key {
        s.replies.insert(k, (params, reply.clone()));
    }
    reply
}

/// Decodes `application/x-www-form-urlencoded`, refusing a repeated key.
fn parse_form(body: &[u8]) -> Result<BTreeMap<String, String>, String> {
    let text = std::str::from_utf8(body).map_err(|_| "the body is not UTF-8".to_string())?;
    let mut out = BTreeMap::new();
    for pair in text.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (k, v) = (decode(k)?, decode(v)?);
        if out.insert(k.clone(), v).is_some() {
            return Err(format!("parameter {k} given twice"));
        }
    }
    Ok(out)
}

fn decode(s: &str) -> Result<String, String> {
    let mut bytes = Vec::with_capacity(s.len());
    let mut it = s.bytes();
    while let Some(b) = it.next() {
        match b {
            b'+' => bytes.push(b' '),
            b'%' => {
                let hex: Vec<u8> = it.by_ref().take(2).collect();
                let v = std::str::from_utf8(&hex)
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("bad percent escape in {s:?}"))?;
                bytes.push(v);
            }
            // Brackets must be escaped in a form body; Stripe's libraries do.
            b'[' | b']' => return Err(format!("unescaped bracket in {s:?}")),
            _ => bytes.push(b),
        }
    }
    String::from_utf8(bytes).map_err(|_| format!("{s:?} is not UTF-8 once decoded"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_decode_as_browsers_and_stripes_libraries_encode_them() {
        let p = parse_form(b"payment_intent=pi_1&metadata%5Bk%5D=a+b%2Fc").unwrap();
        assert_eq!(p["payment_intent"], "pi_1");
        assert_eq!(p["metadata[k]"], "a b/c");
        assert!(parse_form(b"a=1&a=2").is_err());
        assert!(parse_form(b"metadata[k]=1").is_err());
        assert!(parse_form(b"a=%zz").is_err());
    }
}
