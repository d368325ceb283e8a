//! The Stripe webhook events the tests deliver, shaped as Stripe sends them (only the fields
//! the API reads, plus `id`/`object`).

use serde_json::{Value, json};

/// A paid `checkout.session.completed` of a draft order, as the storefront creates the
/// checkout: only the draft's id in the metadata, and what Stripe charged.
pub fn paid_draft(
    session: &str,
    payment: &str,
    order_id: &str,
    amount: i64,
    currency: &str,
) -> Value {
    json!({
        "id": format!("evt_{session}"),
        "type": "checkout.session.completed",
        "data": {"object": {
            "id": session,
            "object": "checkout.session",
            "payment_status": "paid",
            "payment_intent": payment,
            "amount_total": amount,
            "currency": currency,
            "metadata": {"order_id": order_id}
        }}
    })
}

/// [`paid_draft`] of a draft as `POST /v1/orders` answered it (`orderId`, `price`), charged
/// exactly its price.
pub fn paid_draft_at_its_price(session: &str, payment: &str, draft: &Value) -> Value {
    paid_draft(
        session,
        payment,
        draft["orderId"].as_str().unwrap_or_default(),
        draft["price"]["amount"].as_i64().unwrap_or_default(),
        draft["price"]["currency"].as_str().unwrap_or_default(),
    )
}

/// `charge.refunded` of a payment.
pub fn refunded(payment: &str) -> Value {
    json!({
        "id": format!("evt_refund_{payment}"),
        "type": "charge.refunded",
        "data": {"object": {"id": "ch_1", "object": "charge", "refunded": true, "payment_intent": payment}}
    })
}

/// `charge.dispute.created` of a payment.
pub fn dispute_created(payment: &str) -> Value {
    json!({
        "id": format!("evt_dispute_{payment}"),
        "type": "charge.dispute.created",
        "data": {"object": {"id": "dp_1", "object": "dispute", "charge": "ch_1", "payment_intent": payment}}
    })
}

/// Seconds since the Unix epoch (a webhook signature's timestamp).
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
