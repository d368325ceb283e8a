//! Stripe webhooks, the pure part: `Stripe-Signature` verification on the raw body and parsing
//! the few event types that matter into [`WebhookEvent`]. No I/O here.
//!
//! Verification follows Stripe's scheme: the header carries `t=<unix seconds>` and one or more
//! `v1=<hex HMAC-SHA256("{t}.{body}")>`; any matching `v1` is accepted (Stripe sends several
//! while a secret is being rolled), compared in constant time, and the timestamp must be within
//! the tolerance of now in both directions so a captured request cannot be replayed later.
//!
//! The work per request is bounded before any HMAC: a header over [`MAX_HEADER_BYTES`] or with
//! more than [`MAX_SIGNATURES`] `v1` entries is refused, and the body's MAC is computed once
//! per configured secret, not once per entry (a header of 100,000 entries would otherwise cost
//! 100,000 passes over the body).

use std::collections::BTreeMap;

use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;

/// Stripe's default tolerance between the signed timestamp and now.
pub const DEFAULT_TOLERANCE_SECS: i64 = 300;

/// The longest `Stripe-Signature` header accepted (Stripe's are about 150 bytes per secret).
pub const MAX_HEADER_BYTES: usize = 1024;

/// The most `v1` entries accepted (one per endpoint secret; two while one is being rolled).
pub const MAX_SIGNATURES: usize = 4;

/// Why a webhook signature was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    /// No `Stripe-Signature` header.
    #[error("missing Stripe-Signature header")]
    MissingHeader,
    /// The header has no parsable `t=`.
    #[error("Stripe-Signature has no valid timestamp")]
    NoTimestamp,
    /// The header has no `v1=` signature.
    #[error("Stripe-Signature has no v1 signature")]
    NoSignature,
    /// The timestamp is too far from now.
    #[error("Stripe-Signature timestamp is outside the {0} s tolerance")]
    StaleTimestamp(i64),
    /// The header is longer than [`MAX_HEADER_BYTES`].
    #[error("Stripe-Signature is longer than {MAX_HEADER_BYTES} bytes")]
    HeaderTooLong,
    /// The header carries more than [`MAX_SIGNATURES`] `v1` entries.
    #[error("Stripe-Signature carries more than {MAX_SIGNATURES} v1 signatures")]
    TooManySignatures,
    /// No `v1` matches the body.
    #[error("no Stripe-Signature v1 signature matches the body")]
    Mismatch,
}

/// The signature Stripe would send for `body` at time `t` (also used by tests and the bench).
pub fn sign(secret: &[u8], t: i64, body: &[u8]) -> String {
    match signed_mac(secret, t, body) {
        Some(mac) => hex::encode(mac.finalize().into_bytes()),
        None => String::new(),
    }
}

/// A full `Stripe-Signature` header value for `body` at time `t`.
pub fn header(secret: &[u8], t: i64, body: &[u8]) -> String {
    format!("t={t},v1={}", sign(secret, t, body))
}

fn signed_mac(secret: &[u8], t: i64, body: &[u8]) -> Option<Hmac<Sha256>> {
    // HMAC takes keys of any length; the Option only keeps this free of panics.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).ok()?;
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    Some(mac)
}

/// Verifies `header` against the raw `body` with any of `secrets` at time `now`.
pub fn verify(
    header: Option<&str>,
    body: &[u8],
    secrets: &[Vec<u8>],
    now: i64,
    tolerance: i64,
) -> Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::MissingHeader)?;
    if header.len() > MAX_HEADER_BYTES {
        return Err(SignatureError::HeaderTooLong);
    }
    let mut timestamp = None;
    let mut signatures = Vec::new();
    let mut entries = 0;
    for part in header.split(',') {
        let Some((k, v)) = part.trim().split_once('=') else {
            continue;
        };
        match k {
            "t" => timestamp = v.parse::<i64>().ok(),
            "v1" => {
                entries += 1;
                if entries > MAX_SIGNATURES {
                    return Err(SignatureError::TooManySignatures);
                }
                if let Ok(bytes) = hex::decode(v) {
                    signatures.push(bytes);
                }
            }
            _ => {}
        }
    }
    let t = timestamp.ok_or(SignatureError::NoTimestamp)?;
    if signatures.is_empty() {
        return Err(SignatureError::NoSignature);
    }
    for secret in secrets {
        // One pass over the body per secret; each entry costs only a finalisation.
        let Some(mac) = signed_mac(secret, t, body) else {
            continue;
        };
        for sig in &signatures {
            // verify_slice compares in constant time.
            if mac.clone().verify_slice(sig).is_ok() {
                // Only an authentic request learns about the tolerance.
                if (now - t).abs() > tolerance {
                    return Err(SignatureError::StaleTimestamp(tolerance));
                }
                return Ok(());
            }
        }
    }
    Err(SignatureError::Mismatch)
}

/// Why an authentic event could not be understood.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EventError {
    /// Not a JSON Stripe event.
    #[error("event is not valid JSON: {0}")]
    Json(String),
    /// A field the event type needs is missing.
    #[error("event {event_type} lacks {field}")]
    MissingField {
        /// The event type.
        event_type: String,
        /// The missing field.
        field: &'static str,
    },
}

/// The events that change jobs; everything else is acknowledged and ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WebhookEvent {
    /// A checkout session is paid: create its job.
    Paid {
        /// Checkout session id (`cs_…`): the job's identity.
        session_id: String,
        /// The payment intent (`pi_…`) refunds and disputes refer to.
        payment_intent: Option<String>,
        /// The session's metadata; only `order_id` (the draft order) is read, and a paid
        /// checkout without one is refunded.
        metadata: BTreeMap<String, String>,
        /// What was charged, in the currency's smallest unit (`amount_total`).
        amount_total: Option<i64>,
        /// The currency charged, lowercase.
        currency: Option<String>,
    },
    /// A completed session whose payment has not arrived yet (delayed methods).
    AwaitingPayment,
    /// A refund or a dispute: cancel and erase.
    Revoked {
        /// `refund` or `dispute`.
        reason: RevokeReason,
        /// The payment intent of the charge.
        payment_intent: String,
    },
    /// A partial refund: the order stands.
    PartialRefund,
    /// Any other event type.
    Ignored,
}

/// Why an order was revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevokeReason {
    /// `charge.refunded` (full refund).
    Refund,
    /// `charge.dispute.created`.
    Dispute,
}

impl RevokeReason {
    /// The name used in tombstones, events and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            RevokeReason::Refund => "refund",
            RevokeReason::Dispute => "dispute",
        }
    }
}

#[derive(Deserialize)]
struct RawEvent {
    #[serde(rename = "type")]
    event_type: String,
    data: RawData,
}

#[derive(Deserialize)]
struct RawData {
    object: serde_json::Value,
}

/// Parses an (already verified) event body. Returns the event type too, for metrics.
pub fn parse_event(body: &[u8]) -> Result<(String, WebhookEvent), EventError> {
    let raw: RawEvent =
        serde_json::from_slice(body).map_err(|e| EventError::Json(e.to_string()))?;
    let obj = &raw.data.object;
    let ty = raw.event_type.clone();
    let str_field = |name: &'static str| -> Option<String> {
        obj.get(name).and_then(|v| v.as_str()).map(str::to_string)
    };
    let missing = |field| EventError::MissingField {
        event_type: ty.clone(),
        field,
    };
    let event = match raw.event_type.as_str() {
        "checkout.session.completed" | "checkout.session.async_payment_succeeded" => {
            let paid = str_field("payment_status").as_deref() == Some("paid");
            if raw.event_type == "checkout.session.completed" && !paid {
                WebhookEvent::AwaitingPayment
            } else {
                let metadata = obj
                    .get("metadata")
                    .and_then(|m| m.as_object())
                    .map(|m| {
                        m.iter()
                            .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                            .collect()
                    })
                    .unwrap_or_default();
                WebhookEvent::Paid {
                    session_id: str_field("id").ok_or_else(|| missing("data.object.id"))?,
                    payment_intent: str_field("payment_intent"),
                    metadata,
                    amount_total: obj.get("amount_total").and_then(|v| v.as_i64()),
                    currency: str_field("currency"),
                }
            }
        }
        "charge.refunded" => {
            let full = obj.get("refunded").and_then(|v| v.as_bool()) == Some(true);
            if full {
                WebhookEvent::Revoked {
                    reason: RevokeReason::Refund,
                    payment_intent: str_field("payment_intent")
                        .ok_or_else(|| missing("data.object.payment_intent"))?,
                }
            } else {
                WebhookEvent::PartialRefund
            }
        }
        "charge.dispute.created" => WebhookEvent::Revoked {
            reason: RevokeReason::Dispute,
            payment_intent: str_field("payment_intent")
                .ok_or_else(|| missing("data.object.payment_intent"))?,
        },
        _ => WebhookEvent::Ignored,
    };
    Ok((ty, event))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"whsec_test";

    #[test]
    fn a_correct_signature_within_tolerance_verifies() {
        let body = br#"{"type":"x"}"#;
        let h = header(SECRET, 1000, body);
        assert_eq!(
            verify(Some(&h), body, &[SECRET.to_vec()], 1200, 300),
            Ok(())
        );
    }

    #[test]
    fn any_matching_v1_among_several_is_accepted() {
        let body = b"{}";
        let good = sign(SECRET, 1000, body);
        let h = format!("t=1000,v1={},v0=abc,v1={good}", "00".repeat(32));
        assert_eq!(
            verify(Some(&h), body, &[SECRET.to_vec()], 1000, 300),
            Ok(())
        );
        // and a rolled secret: the second configured secret matches
        assert_eq!(
            verify(
                Some(&h),
                body,
                &[b"old".to_vec(), SECRET.to_vec()],
                1000,
                300
            ),
            Ok(())
        );
    }

    #[test]
    fn tampered_body_wrong_secret_and_stale_time_are_refused() {
        let body = br#"{"amount":1}"#;
        let h = header(SECRET, 1000, body);
        let secrets = [SECRET.to_vec()];
        assert_eq!(
            verify(Some(&h), br#"{"amount":2}"#, &secrets, 1000, 300),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(Some(&h), body, &[b"other".to_vec()], 1000, 300),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(Some(&h), body, &secrets, 1301, 300),
            Err(SignatureError::StaleTimestamp(300))
        );
        assert_eq!(
            verify(Some(&h), body, &secrets, 699, 300),
            Err(SignatureError::StaleTimestamp(300))
        );
        assert_eq!(
            verify(None, body, &secrets, 1000, 300),
            Err(SignatureError::MissingHeader)
        );
        assert_eq!(
            verify(Some("v1=00"), body, &secrets, 1000, 300),
            Err(SignatureError::NoTimestamp)
        );
        assert_eq!(
            verify(Some("t=1000"), body, &secrets, 1000, 300),
            Err(SignatureError::NoSignature)
        );
    }

    #[test]
    fn oversized_headers_are_refused_before_any_hmac() {
        let body = b"{}";
        let good = sign(SECRET, 1000, body);
        let entries = |n: usize| {
            let mut h = String::from("t=1000");
            for _ in 0..n {
                h.push_str(&format!(",v1={good}"));
            }
            h
        };
        let secrets = [SECRET.to_vec()];
        assert_eq!(
            verify(Some(&entries(MAX_SIGNATURES)), body, &secrets, 1000, 300),
            Ok(())
        );
        let many = format!("t=1000{}", ",v1=0".repeat(MAX_SIGNATURES + 1));
        assert_eq!(
            verify(Some(&many), body, &secrets, 1000, 300),
            Err(SignatureError::TooManySignatures)
        );
        assert_eq!(
            verify(Some(&entries(100_000)), body, &secrets, 1000, 300),
            Err(SignatureError::HeaderTooLong)
        );
    }

    #[test]
    fn paid_sessions_refunds_and_disputes_parse() {
        let body = br#"{"id":"evt_1","type":"checkout.session.completed","data":{"object":{"id":"cs_1","payment_status":"paid","payment_intent":"pi_1","amount_total":1900,"currency":"eur","metadata":{"plan":"basic"}}}}"#;
        let (ty, ev) = parse_event(body).unwrap();
        assert_eq!(ty, "checkout.session.completed");
        assert_eq!(
            ev,
            WebhookEvent::Paid {
                session_id: "cs_1".into(),
                payment_intent: Some("pi_1".into()),
                metadata: BTreeMap::from([("plan".into(), "basic".into())]),
                amount_total: Some(1900),
                currency: Some("eur".into()),
            }
        );
        let unpaid = br#"{"type":"checkout.session.completed","data":{"object":{"id":"cs_1","payment_status":"unpaid"}}}"#;
        assert_eq!(
            parse_event(unpaid).unwrap().1,
            WebhookEvent::AwaitingPayment
        );
        let async_ok = br#"{"type":"checkout.session.async_payment_succeeded","data":{"object":{"id":"cs_2","payment_status":"paid"}}}"#;
        assert!(matches!(
            parse_event(async_ok).unwrap().1,
            WebhookEvent::Paid { .. }
        ));
        let refund = br#"{"type":"charge.refunded","data":{"object":{"id":"ch_1","refunded":true,"payment_intent":"pi_1"}}}"#;
        assert_eq!(
            parse_event(refund).unwrap().1,
            WebhookEvent::Revoked {
                reason: RevokeReason::Refund,
                payment_intent: "pi_1".into()
            }
        );
        let partial = br#"{"type":"charge.refunded","data":{"object":{"id":"ch_1","refunded":false,"payment_intent":"pi_1"}}}"#;
        assert_eq!(parse_event(partial).unwrap().1, WebhookEvent::PartialRefund);
        let dispute = br#"{"type":"charge.dispute.created","data":{"object":{"id":"dp_1","charge":"ch_1","payment_intent":"pi_1"}}}"#;
        assert!(matches!(
            parse_event(dispute).unwrap().1,
            WebhookEvent::Revoked {
                reason: RevokeReason::Dispute,
                ..
            }
        ));
        let other = br#"{"type":"invoice.paid","data":{"object":{}}}"#;
        assert_eq!(parse_event(other).unwrap().1, WebhookEvent::Ignored);
        assert!(parse_event(b"not json").is_err());
        let no_pi = br#"{"type":"charge.dispute.created","data":{"object":{"id":"dp_1"}}}"#;
        assert!(matches!(
            parse_event(no_pi),
            Err(EventError::MissingField { .. })
        ));
    }

    proptest::proptest! {
        /// Whatever the header, the answer is an error or a match, never a panic, and a header
        /// over the limits is refused before any MAC is computed.
        #[test]
        fn any_header_is_answered_without_panicking(header in ".{0,2000}", body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let r = verify(Some(&header), &body, &[SECRET.to_vec()], 1000, 300);
            if header.len() > MAX_HEADER_BYTES {
                proptest::prop_assert_eq!(r, Err(SignatureError::HeaderTooLong));
            } else {
                proptest::prop_assert!(r.is_err(), "a random header verified: {header:?}");
            }
        }

        /// A genuine signature among junk entries verifies; the same header over any other
        /// body does not; more than MAX_SIGNATURES v1 entries are refused whatever they hold.
        #[test]
        fn a_genuine_signature_verifies_only_its_own_body(
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 1..256),
            flip in proptest::prelude::any::<proptest::sample::Index>(),
            junk in proptest::collection::vec("[a-z0-9]{1,3}=[0-9a-f]{0,64}", 0..3),
            extra in 0usize..8,
        ) {
            let mut parts: Vec<String> = junk.into_iter().filter(|j| !j.starts_with("v1=")).collect();
            parts.push(header(SECRET, 1000, &body));
            let h = parts.join(",");
            proptest::prop_assume!(h.len() <= MAX_HEADER_BYTES);
            proptest::prop_assert_eq!(verify(Some(&h), &body, &[SECRET.to_vec()], 1000, 300), Ok(()));
            let mut other = body.clone();
            let i = flip.index(other.len());
            other[i] ^= 0x01;
            proptest::prop_assert_eq!(
                verify(Some(&h), &other, &[SECRET.to_vec()], 1000, 300),
                Err(SignatureError::Mismatch)
            );
            let flood = format!("{h}{}", ",v1=00".repeat(MAX_SIGNATURES + extra));
            proptest::prop_assert_eq!(
                verify(Some(&flood), &body, &[SECRET.to_vec()], 1000, 300),
                Err(SignatureError::TooManySignatures)
            );
        }
    }
}
