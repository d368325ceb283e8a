//! Money back through Stripe's Refunds API (`POST /v1/refunds`): a paid checkout that cannot
//! become a job, or that charged another price than its draft quoted, is refunded before its
//! webhook is acknowledged.
//!
//! At least once, never twice: the request carries an `Idempotency-Key` derived from the order,
//! so a retry (the webhook redelivered after a failure or a restart) gets the same refund back
//! from Stripe; past Stripe's 24-hour key memory a second refund of a refunded payment is
//! refused with `charge_already_refunded`, which counts as done. A failed call fails the webhook
//! (5xx), and Stripe redelivers it for up to three days.
//!
//! Only the payment intent and our reason code go to Stripe, never customer text; payment ids
//! are never logged. The request is built by pure functions ([`form`], [`idempotency_key`]);
//! [`Stripe::refund`] does the I/O.

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Why we give the money back, sent as the refund's `metadata[loraplane_reason]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefundReason {
    /// The paid checkout's order is unusable (bad metadata, dataset, plan or upload, or a
    /// draft that no longer exists).
    OrderRejected,
    /// The checkout charged another amount or currency than the draft order quoted.
    PriceMismatch,
    /// The paid job failed for good.
    JobFailed,
    /// The paid job was cancelled by the platform.
    JobCancelled,
}

impl RefundReason {
    /// The code Stripe's dashboard shows.
    pub fn as_str(self) -> &'static str {
        match self {
            RefundReason::OrderRejected => "order_rejected",
            RefundReason::PriceMismatch => "price_mismatch",
            RefundReason::JobFailed => "job_failed",
            RefundReason::JobCancelled => "job_cancelled",
        }
    }
}

/// The refund's state as Stripe reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefundState {
    /// The money is on its way back.
    Succeeded,
    /// Stripe is processing it.
    Pending,
    /// The customer must act (some payment methods).
    RequiresAction,
    /// The payment was refunded before (an earlier delivery, or by hand).
    AlreadyRefunded,
}

/// Why a refund did not go through.
#[derive(Debug, thiserror::Error)]
pub enum RefundError {
    /// The HTTPS client could not be set up.
    #[error("setting up the Stripe client: {0}")]
    SetupClient(String),
    /// The request could not be sent or answered.
    #[error("sending the refund request to Stripe: {0}")]
    Send(String),
    /// Stripe took longer than the configured timeout.
    #[error("the refund request to Stripe timed out")]
    Timeout,
    /// Stripe answered with an error.
    #[error("Stripe refused the refund: HTTP {status} ({code})")]
    Refused {
        /// HTTP status.
        status: u16,
        /// Stripe's error code (`error.code`), or `unknown`.
        code: String,
    },
    /// Stripe's answer was not a refund.
    #[error("reading Stripe's refund answer: {0}")]
    ReadAnswer(String),
}

/// The `Idempotency-Key` of an order's refund: the same order always asks for the same refund.
pub fn idempotency_key(order_hash: &str) -> String {
    format!("loraplane-refund-{order_hash}")
}

/// The form body of a full refund of `payment_intent`.
pub fn form(payment_intent: &str, reason: RefundReason) -> String {
    [
        ("payment_intent", payment_intent),
        ("metadata[loraplane_reason]", reason.as_str()),
    ]
    .iter()
    .map(|(k, v)| format!("{}={}", form_encode(k), form_encode(v)))
    .collect::<Vec<_>>()
    .join("&")
}

/// `application/x-www-form-urlencoded` encoding of one key or value.
fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => {
                out.push(char::from(b))
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// What a Stripe answer means: a refund's state, or why it is not one.
pub fn read_answer(status: u16, body: &[u8]) -> Result<RefundState, RefundError> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| RefundError::ReadAnswer(e.to_string()))?;
    if (200..300).contains(&status) {
        return match v["status"].as_str() {
            Some("succeeded") => Ok(RefundState::Succeeded),
            Some("pending") => Ok(RefundState::Pending),
            Some("requires_action") => Ok(RefundState::RequiresAction),
            other => Err(RefundError::ReadAnswer(format!(
                "unexpected refund status {other:?}"
            ))),
        };
    }
    let code = v["error"]["code"].as_str().unwrap_or("unknown").to_string();
    if code == "charge_already_refunded" {
        return Ok(RefundState::AlreadyRefunded);
    }
    Err(RefundError::Refused { status, code })
}

/// Stripe's API, with the platform's secret key.
pub struct Stripe {
    base: String,
    key: String,
    timeout: Duration,
    client: HttpsClient,
}

impl std::fmt::Debug for Stripe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stripe")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

/// An HTTP(S) client for the outside world (Stripe, storefronts), trusting the system's roots.
pub type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Builds an [`HttpsClient`].
pub fn https_client() -> Result<HttpsClient, RefundError> {
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_native_roots()
        .map_err(|e| RefundError::SetupClient(e.to_string()))?
        .https_or_http()
        .enable_http1()
        .build();
    Ok(Client::builder(TokioExecutor::new()).build(https))
}

impl Stripe {
    /// A client for the API at `base` (`https://api.stripe.com` in production).
    pub fn new(base: &str, key: &str, timeout: Duration) -> Result<Stripe, RefundError> {
        Ok(Stripe {
            base: base.trim_end_matches('/').to_string(),
            key: key.to_string(),
            timeout,
            client: https_client()?,
        })
    }

    /// Refunds `payment_intent` in full, once per order whatever the number of calls.
    pub async fn refund(
        &self,
        payment_intent: &str,
        order_hash: &str,
        reason: RefundReason,
    ) -> Result<RefundState, RefundError> {
        let req = hyper::Request::post(format!("{}/v1/refunds", self.base))
            .header("authorization", format!("Bearer {}", self.key))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("idempotency-key", idempotency_key(order_hash))
            .body(Full::new(Bytes::from(form(payment_intent, reason))))
            .map_err(|e| RefundError::Send(e.to_string()))?;
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| RefundError::Send(e.to_string()))?;
            let status = resp.status().as_u16();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| RefundError::Send(e.to_string()))?
                .to_bytes();
            read_answer(status, &body)
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| RefundError::Timeout)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_is_a_form_with_the_payment_and_our_reason_only() {
        assert_eq!(
            form("pi_3Mt0", RefundReason::OrderRejected),
            "payment_intent=pi_3Mt0&metadata%5Bloraplane_reason%5D=order_rejected"
        );
        assert_eq!(form_encode("a b&c=d/é"), "a+b%26c%3Dd%2F%C3%A9");
        assert_eq!(idempotency_key("abc"), "loraplane-refund-abc");
    }

    #[test]
    fn answers_are_read_as_stripe_documents_them() {
        let ok = br#"{"id":"re_1","object":"refund","status":"succeeded"}"#;
        assert_eq!(read_answer(200, ok).unwrap(), RefundState::Succeeded);
        let pending = br#"{"id":"re_1","object":"refund","status":"pending"}"#;
        assert_eq!(read_answer(200, pending).unwrap(), RefundState::Pending);
        let again =
            br#"{"error":{"type":"invalid_request_error","code":"charge_already_refunded"}}"#;
        assert_eq!(
            read_answer(400, again).unwrap(),
            RefundState::AlreadyRefunded
        );
        let down = br#"{"error":{"type":"api_error","code":"internal"}}"#;
        assert!(matches!(
            read_answer(500, down),
            Err(RefundError::Refused { status: 500, .. })
        ));
        assert!(read_answer(200, b"<html>").is_err());
    }
}
