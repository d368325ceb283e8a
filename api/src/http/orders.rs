//! Orders: the Stripe webhook, draft orders (`POST /v1/orders`) and service-API jobs
//! (`POST /v1/jobs`), each handler translating HTTP to an `App` call.

use super::*;

/// Webhook acknowledgement.
#[derive(Serialize, Deserialize, ToSchema, Debug)]
pub struct WebhookAck {
    /// Always true for a 2xx.
    pub received: bool,
    /// What was done: created, duplicate, revoked_first, erased, tombstoned, ignored, rejected,
    /// refunded.
    pub outcome: String,
}

/// Receives Stripe events.
#[utoipa::path(post, path = "/v1/webhooks/stripe", tag = "webhooks",
    request_body(content = String, description = "Raw Stripe event JSON", content_type = "application/json"),
    params(("Stripe-Signature" = String, Header, description = "t=…,v1=…")),
    responses(
        (status = 200, body = WebhookAck),
        (status = 400, body = ErrorBody, description = "bad signature, stale timestamp or malformed event"),
        (status = 413, body = ErrorBody),
        (status = 502, body = ErrorBody, description = "cluster or storage failed; Stripe retries"),
    ))]
pub async fn stripe_webhook(
    State(s): State<HttpState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<WebhookAck>, ApiError> {
    let app = &s.app;
    let bytes = read_body(body, app.config.limits.webhook_max_bytes).await?;
    let sig = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok());
    let now = Timestamp::now().as_second();
    if let Err(e) = stripe::verify(
        sig,
        &bytes,
        &app.secrets.webhook,
        now,
        stripe::DEFAULT_TOLERANCE_SECS,
    ) {
        let code = match e {
            stripe::SignatureError::StaleTimestamp(_) => "stale_timestamp",
            _ => "invalid_signature",
        };
        app.metrics
            .webhook_events
            .with_label_values(&["unverified", code])
            .inc();
        return Err(ApiError::new(StatusCode::BAD_REQUEST, code, e.to_string()));
    }
    let (ty, event) = stripe::parse_event(&bytes).map_err(|e| {
        app.metrics
            .webhook_events
            .with_label_values(&["unparsed", "malformed"])
            .inc();
        ApiError::new(StatusCode::BAD_REQUEST, "malformed_event", e.to_string())
    })?;
    let type_label = match ty.as_str() {
        "checkout.session.completed"
        | "checkout.session.async_payment_succeeded"
        | "charge.refunded"
        | "charge.dispute.created" => ty.as_str(),
        _ => "other",
    };
    match app.handle_event(event).await {
        Ok(outcome) => {
            app.metrics
                .webhook_events
                .with_label_values(&[type_label, outcome.as_str()])
                .inc();
            tracing::info!(
                event_type = type_label,
                outcome = outcome.as_str(),
                "webhook event handled"
            );
            Ok(Json(WebhookAck {
                received: true,
                outcome: outcome.as_str().into(),
            }))
        }
        Err(e) => {
            app.metrics
                .webhook_events
                .with_label_values(&[type_label, "error"])
                .inc();
            Err(e.into())
        }
    }
}

/// A job order from the service's backend.
#[derive(Serialize, Deserialize, ToSchema, Debug)]
#[serde(rename_all = "camelCase")]
pub struct CreateJobRequest {
    /// The paid order's id in the service's backend; one job per order.
    pub order_id: String,
    /// The order.
    #[serde(flatten)]
    pub order: Order,
}

/// A draft order: what the storefront puts in the checkout session's metadata (`order_id`,
/// nothing else of the order) and the price the checkout must charge.
#[derive(Serialize, Deserialize, ToSchema, Debug)]
#[serde(rename_all = "camelCase")]
pub struct DraftTicket {
    /// The draft's id: the checkout session's `metadata.order_id`.
    pub order_id: String,
    /// The price the checkout session must charge (`amount_total`, `currency`).
    pub price: crate::config::Price,
    /// When an unpaid draft is deleted, with its upload (RFC 3339).
    pub expires_at: String,
}

/// Records everything the customer chose, checked as a job would be, before checkout: the
/// customer's words stay in the upload's region instead of travelling in Stripe's metadata.
#[utoipa::path(post, path = "/v1/orders", tag = "orders", security(("bearer" = [])),
    request_body = Order,
    params(("Idempotency-Key" = String, Header, description = "Required; the same key and order return the same draft")),
    responses(
        (status = 201, body = DraftTicket, description = "the draft and its price"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody, description = "the tenant is not the Stripe namespace's storefront"),
        (status = 422, body = ErrorBody, description = "the order, its plan or its dataset is unusable")))]
pub async fn create_order(
    State(s): State<HttpState>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<DraftTicket>), ApiError> {
    let tenant = s.tenant(&headers)?;
    // Checkouts complete in the Stripe namespace: only its tenant's drafts can ever be paid.
    if tenant.namespace != s.app.config.stripe_namespace {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "orders_not_enabled",
            "draft orders are for the storefront tenant that takes payments through Stripe; order with POST /v1/jobs",
        ));
    }
    let key = idempotency_key(&headers)?;
    let bytes = read_body(body, s.app.config.limits.json_max_bytes).await?;
    let order: Order = parse_json(&bytes)?;
    let (id, draft) = s.app.create_draft(&tenant.namespace, &order, &key).await?;
    let expires = draft.created_at
        + i64::try_from(s.app.platform.defaults.upload_ttl_seconds).unwrap_or(i64::MAX / 2);
    Ok((
        StatusCode::CREATED,
        Json(DraftTicket {
            order_id: id.to_id(),
            price: draft.price,
            expires_at: Timestamp::from_second(expires)
                .map(|t| t.to_string())
                .unwrap_or_default(),
        }),
    ))
}

/// The request's Idempotency-Key (1 to 255 characters), required.
pub(super) fn idempotency_key(headers: &HeaderMap) -> Result<String, ApiError> {
    headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .filter(|k| !k.is_empty() && k.len() <= 255)
        .map(str::to_string)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "idempotency_key_required",
                "an Idempotency-Key header (1 to 255 characters) is required",
            )
        })
}

/// Creates the job of a paid order.
#[utoipa::path(post, path = "/v1/jobs", tag = "jobs", security(("bearer" = [])),
    request_body = CreateJobRequest,
    params(("Idempotency-Key" = String, Header, description = "Required; retries with the same key and body return the same job")),
    responses(
        (status = 201, body = JobView, description = "created"),
        (status = 200, body = JobView, description = "replay of an earlier request with the same Idempotency-Key"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 422, body = ErrorBody), (status = 429, body = ErrorBody),
    ))]
pub async fn create_job(
    State(s): State<HttpState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let tenant = s.tenant(&headers)?;
    let key = idempotency_key(&headers)?;
    let bytes = read_body(body, s.app.config.limits.json_max_bytes).await?;
    let req: CreateJobRequest = parse_json(&bytes)?;
    if req.order_id.is_empty() || req.order_id.len() > 255 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "order_field_invalid",
            "orderId must be 1 to 255 characters",
        ));
    }
    let app = &s.app;
    let ns = tenant.namespace.clone();
    let key_hash = app.hash(&format!("idempotency:{ns}"), &key);
    let body_hash = sha256_hex(&bytes);
    if let Some(job) = app.job_by_idempotency_key(&ns, &key_hash).await? {
        let same = job.annotations().get(ANNOTATION_REQUEST) == Some(&body_hash);
        if !same {
            return Err(AppError::IdempotencyMismatch.into());
        }
        let mut resp = (StatusCode::OK, Json(JobView::of(&job))).into_response();
        resp.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
        return Ok(resp);
    }
    let ids = OrderIds {
        source: "api",
        order_hash: app.hash(&format!("order:{ns}"), &req.order_id),
        payment_hash: None,
        idempotency: Some((key_hash.clone(), body_hash)),
    };
    let (job, created) = app.create_job(&ns, &req.order, &ids).await?;
    if !created {
        // Same order, another key: the order already has its job.
        let same_key = job.labels().get(crate::order::LABEL_IDEMPOTENCY) == Some(&key_hash);
        if !same_key {
            return Err(AppError::OrderExists(job.name_any()).into());
        }
    }
    tracing::info!(tenant = %tenant.name, job = %job.name_any(), created, "job ordered");
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(JobView::of(&job))).into_response())
}
