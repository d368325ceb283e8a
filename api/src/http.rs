//! The HTTP surface: routes, authentication, rate limits, request ids, JSON errors, metrics and
//! the OpenAPI document generated from the handlers' annotations.
//!
//! Every 4xx/5xx leaves as `{"error": {"code", "message"}}` — including axum's own rejections
//! and unknown routes, which a last middleware rewrites. Logs carry the request id, route,
//! status and tenant, never bodies, tokens or order details.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use loraplane_crds::v1alpha1::LoRATrainingJob;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::{OpenApi, ToSchema};

use crate::app::{App, AppError, OrderIds, sha256_hex};
use crate::config::{Tenant, parse_residency};
use crate::order::{ANNOTATION_REQUEST, Order, UploadId};
use crate::{client_ip, stripe};
use loraplane_crds::v1alpha1::ErasureReason;
use loraplane_dataset::DatasetError;
use loraplane_runtime::storage::StorageError;

/// An error response.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Machine code.
    pub code: String,
    /// Human message.
    pub message: String,
    /// Seconds to wait (429).
    pub retry_after: Option<u64>,
}

/// The JSON body of every error.
#[derive(Serialize, Deserialize, ToSchema, Debug)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// Code and message of an error.
#[derive(Serialize, Deserialize, ToSchema, Debug)]
pub struct ErrorDetail {
    /// Machine-readable code, e.g. `invalid_signature`.
    pub code: String,
    /// Human-readable message.
    pub message: String,
}

impl ApiError {
    /// An error with a status, code and message.
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code: code.into(),
            message: message.into(),
            retry_after: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: self.message,
            },
        };
        let mut resp = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after
            && let Ok(v) = HeaderValue::from_str(&secs.to_string())
        {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        resp
    }
}

impl From<AppError> for ApiError {
    fn from(e: AppError) -> ApiError {
        let msg = e.to_string();
        let safe = e.log_safe();
        match &e {
            AppError::Order(o) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, o.code(), msg),
            // Only the customer who uploaded the zip sees an entry's file name: here.
            AppError::Upload(z) => {
                let msg = match z.entry() {
                    Some(entry) => format!("{msg} (file {:?})", entry.name),
                    None => msg,
                };
                let status = match z {
                    DatasetError::ZipTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
                    _ => StatusCode::UNPROCESSABLE_ENTITY,
                };
                ApiError::new(status, z.code(), msg)
            }
            AppError::Storage(StorageError::Changed) => ApiError::new(
                StatusCode::CONFLICT,
                "upload_changed",
                "the upload was replaced while it was being checked; check it again",
            ),
            AppError::CheckDataset => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "check_interrupted", msg)
            }
            AppError::Refund(_) => {
                tracing::error!(error = %safe, "refunding a paid order failed; Stripe will redeliver");
                ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "refund_failed",
                    "the order could not be refunded yet; deliver the event again",
                )
            }
            AppError::UploadNotFound(_) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "upload_not_found", msg)
            }
            AppError::UploadConsumed(_) => {
                ApiError::new(StatusCode::CONFLICT, "upload_consumed", msg)
            }
            AppError::BadContinue => {
                ApiError::new(StatusCode::BAD_REQUEST, "continue_invalid", msg)
            }
            AppError::BadUploadId(_) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "upload_id_invalid", msg)
            }
            AppError::JobNotFound(_) => ApiError::new(StatusCode::NOT_FOUND, "job_not_found", msg),
            AppError::IdempotencyMismatch => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                msg,
            ),
            AppError::OrderExists(_) => ApiError::new(StatusCode::CONFLICT, "order_exists", msg),
            AppError::Revoked(_) => ApiError::new(StatusCode::CONFLICT, "order_revoked", msg),
            AppError::Kube { action, .. } => {
                tracing::error!(error = %safe, "kubernetes call failed");
                ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "cluster_unavailable",
                    format!("{action} failed; retry later"),
                )
            }
            AppError::Ledger(_) => {
                tracing::error!(error = %safe, "order ledger call failed");
                ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "cluster_unavailable",
                    "recording the order failed; retry later",
                )
            }
            AppError::Storage(_) => {
                tracing::error!(error = %safe, "storage call failed");
                ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "storage_unavailable",
                    "object storage failed; retry later",
                )
            }
        }
    }
}

/// Token buckets keyed by tenant or client address.
#[derive(Debug, Default)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    /// Takes a token for `key` at `rate` per second (burst 2x); `Err(seconds)` when empty.
    pub fn check(&self, key: &str, rate: f64) -> Result<(), u64> {
        if rate <= 0.0 {
            return Ok(());
        }
        let burst = (rate * 2.0).max(1.0);
        let now = Instant::now();
        let Ok(mut map) = self.buckets.lock() else {
            return Ok(());
        };
        if map.len() > 100_000 {
            // Bound memory under an address-spraying flood: full buckets are forgettable.
            map.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * rate < burst
            });
        }
        let (tokens, at) = map.entry(key.to_string()).or_insert((burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * rate).min(burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - *tokens) / rate).ceil().max(1.0) as u64)
        }
    }
}

/// Everything the handlers share.
#[derive(Debug, Clone)]
pub struct HttpState {
    /// The application.
    pub app: Arc<App>,
    /// Tenants by token hash.
    pub tokens: Arc<HashMap<String, Tenant>>,
    /// Rate limits.
    pub limiter: Arc<RateLimiter>,
    /// Proxies whose `X-Forwarded-For` names the client (`limits.trustedProxies`).
    trusted_proxies: Arc<Vec<client_ip::Cidr>>,
    /// The last readiness answer and when it was found.
    ready: Arc<Mutex<Option<(Instant, bool)>>>,
}

impl HttpState {
    /// State for an app.
    pub fn new(app: Arc<App>) -> HttpState {
        let tokens = app
            .config
            .tenants
            .iter()
            .flat_map(|t| {
                t.token_hashes()
                    .map(|h| (h.to_ascii_lowercase(), t.clone()))
            })
            .collect();
        let trusted_proxies = app
            .config
            .limits
            .trusted_proxies
            .iter()
            .filter_map(|c| client_ip::Cidr::parse(c))
            .collect();
        HttpState {
            app,
            tokens: Arc::new(tokens),
            limiter: Arc::new(RateLimiter::default()),
            ready: Arc::new(Mutex::new(None)),
            trusted_proxies: Arc::new(trusted_proxies),
        }
    }

    fn tenant(&self, headers: &HeaderMap) -> Result<Tenant, ApiError> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "a bearer token is required",
                )
            })?;
        // Looking up a hash (not the token) keeps tokens out of memory dumps of the config
        // and makes the lookup time independent of how much of a guess is right.
        let hash = hex::encode(Sha256::digest(token.trim().as_bytes()));
        let tenant = self.tokens.get(&hash).cloned().ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "the bearer token is not valid",
            )
        })?;
        if let Err(secs) = self.limiter.check(
            &format!("tenant:{}", tenant.name),
            self.app.config.limits.tenant_rps,
        ) {
            return Err(rate_limited(secs));
        }
        Ok(tenant)
    }
}

fn rate_limited(secs: u64) -> ApiError {
    ApiError {
        retry_after: Some(secs),
        ..ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many requests; retry later",
        )
    }
}

async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the request body exceeds {limit} bytes"),
        )
    })
}

fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        // serde's message names the field and position, never echoes values.
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", e.to_string())
    })
}

/// Webhook acknowledgement.
#[derive(Serialize, Deserialize, ToSchema, Debug)]
pub struct WebhookAck {
    /// Always true for a 2xx.
    pub received: bool,
    /// What was done: created, duplicate, revoked_first, erased, tombstoned, ignored, rejected.
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

/// A job as tenants see it: no customer text.
#[derive(Serialize, Deserialize, ToSchema, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct JobView {
    /// The job id.
    pub id: String,
    /// Pending, Scheduling, Running, Succeeded, Failed or Cancelled.
    pub phase: String,
    /// Steps completed.
    pub step: Option<i64>,
    /// Steps in total.
    pub total_steps: i64,
    /// Estimated seconds to completion.
    pub eta_seconds: Option<i64>,
    /// Number of LoRA files ready (fetch them from `/v1/jobs/{id}/artifacts`).
    pub artifacts: usize,
    /// Region the job runs in.
    pub region: Option<String>,
    /// Creation time (RFC 3339).
    pub created_at: Option<String>,
    /// When the outputs expire (RFC 3339).
    pub outputs_expire_at: Option<String>,
}

impl JobView {
    /// The tenant's view of a job.
    pub fn of(job: &LoRATrainingJob) -> JobView {
        let st = job.status.as_ref();
        JobView {
            id: job.name_any(),
            phase: st
                .and_then(|s| s.phase)
                .map(|p| p.as_str().to_string())
                .unwrap_or_else(|| "Pending".into()),
            step: st.and_then(|s| s.progress.as_ref()).map(|p| p.step),
            total_steps: job.spec.training.steps,
            eta_seconds: st
                .and_then(|s| s.progress.as_ref())
                .and_then(|p| p.eta_seconds),
            artifacts: st.map(|s| s.artifacts.len()).unwrap_or(0),
            region: st
                .and_then(|s| s.placement.as_ref())
                .map(|p| p.region.clone()),
            created_at: job
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.to_string()),
            outputs_expire_at: st
                .and_then(|s| s.retention.as_ref())
                .and_then(|r| r.outputs_expire_at.as_ref())
                .map(|t| t.0.to_string()),
        }
    }
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
fn idempotency_key(headers: &HeaderMap) -> Result<String, ApiError> {
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

/// A job id from the path, checked to be a Kubernetes object name (lowercase letters, digits,
/// `-` and `.`, at most 253) before it reaches the apiserver: anything else is a 400 here, not
/// a 502 from a malformed apiserver URL.
#[derive(Debug)]
pub struct JobId(pub String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for JobId {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<JobId, ApiError> {
        let invalid = || {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "job_id_invalid",
                "a job id is 1 to 253 lowercase letters, digits, '-' and '.'",
            )
        };
        let Path(id) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|_| invalid())?;
        if is_object_name(&id) {
            Ok(JobId(id))
        } else {
            Err(invalid())
        }
    }
}

/// A DNS-1123 subdomain, what Kubernetes accepts as an object name.
fn is_object_name(s: &str) -> bool {
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    (1..=253).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && edge(s.chars().next())
        && edge(s.chars().last())
}

/// One job.
#[utoipa::path(get, path = "/v1/jobs/{id}", tag = "jobs", security(("bearer" = [])),
    params(("id" = String, Path)),
    responses((status = 200, body = JobView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get_job(
    State(s): State<HttpState>,
    headers: HeaderMap,
    JobId(id): JobId,
) -> Result<Json<JobView>, ApiError> {
    let tenant = s.tenant(&headers)?;
    let job = s.app.get_job(&tenant.namespace, &id).await?;
    Ok(Json(JobView::of(&job)))
}

/// Paging parameters.
#[derive(Deserialize, Debug, utoipa::IntoParams)]
pub struct Page {
    /// Page size (1 to 100, default 20).
    pub limit: Option<u32>,
    /// The `next` token of the previous page.
    #[serde(rename = "continue")]
    pub continue_token: Option<String>,
}

/// A page of jobs.
#[derive(Serialize, Deserialize, ToSchema, Debug)]
pub struct JobList {
    /// The jobs.
    pub items: Vec<JobView>,
    /// Token for the next page, absent on the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// The tenant's jobs, a page at a time.
#[utoipa::path(get, path = "/v1/jobs", tag = "jobs", security(("bearer" = [])), params(Page),
    responses((status = 200, body = JobList), (status = 401, body = ErrorBody)))]
pub async fn list_jobs(
    State(s): State<HttpState>,
    headers: HeaderMap,
    Query(page): Query<Page>,
) -> Result<Json<JobList>, ApiError> {
    let tenant = s.tenant(&headers)?;
    let limit = page.limit.unwrap_or(20).clamp(1, 100);
    let (jobs, next) = s
        .app
        .list_jobs(&tenant.namespace, limit, page.continue_token)
        .await?;
    Ok(Json(JobList {
        items: jobs.iter().map(JobView::of).collect(),
        next,
    }))
}

/// Cancels a job.
#[utoipa::path(post, path = "/v1/jobs/{id}/cancel", tag = "jobs", security(("bearer" = [])),
    params(("id" = String, Path)),
    responses((status = 200, body = JobView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn cancel_job(
    State(s): State<HttpState>,
    headers: HeaderMap,
    JobId(id): JobId,
) -> Result<Json<JobView>, ApiError> {
    let tenant = s.tenant(&headers)?;
    let job = s.app.cancel(&tenant.namespace, &id).await?;
    Ok(Json(JobView::of(&job)))
}

/// A recorded consent withdrawal.
#[derive(Serialize, Deserialize, ToSchema, Debug)]
#[serde(rename_all = "camelCase")]
pub struct ConsentWithdrawn {
    /// The job.
    pub id: String,
    /// Whether the order had given training consent at all; false means nothing was ever
    /// going to be copied.
    pub consent_given: bool,
    /// Always true: the withdrawal is recorded on the job and cannot be undone.
    pub consent_withdrawn: bool,
}

/// Withdraws the customer's training consent. Answered 202 once recorded on the job: the
/// operator deletes the job's copy in the consented corpus, or never makes it.
#[utoipa::path(post, path = "/v1/jobs/{id}/consent/withdraw", tag = "jobs", security(("bearer" = [])),
    params(("id" = String, Path)),
    responses((status = 202, body = ConsentWithdrawn), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn withdraw_consent(
    State(s): State<HttpState>,
    headers: HeaderMap,
    JobId(id): JobId,
) -> Result<(StatusCode, Json<ConsentWithdrawn>), ApiError> {
    let tenant = s.tenant(&headers)?;
    let job = s.app.withdraw_consent(&tenant.namespace, &id).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(ConsentWithdrawn {
            id,
            consent_given: job.spec.data_use.training_consent,
            consent_withdrawn: true,
        }),
    ))
}

/// An accepted erasure request.
#[derive(Serialize, Deserialize, ToSchema, Debug)]
#[serde(rename_all = "camelCase")]
pub struct ErasureAccepted {
    /// The job being erased.
    pub id: String,
    /// Always true: the request is recorded on the job and cannot be withdrawn.
    pub erasure_requested: bool,
}

/// Requests the erasure of a job and all its data. Answered 202 once the request is recorded:
/// the operator stops the job, deletes every byte of it and then the job itself (seconds);
/// afterwards `GET /v1/jobs/{id}` answers 404.
#[utoipa::path(delete, path = "/v1/jobs/{id}", tag = "jobs", security(("bearer" = [])),
    params(("id" = String, Path)),
    responses((status = 202, body = ErasureAccepted), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn erase_job(
    State(s): State<HttpState>,
    headers: HeaderMap,
    JobId(id): JobId,
) -> Result<(StatusCode, Json<ErasureAccepted>), ApiError> {
    let tenant = s.tenant(&headers)?;
    if !s
        .app
        .erase(&tenant.namespace, &id, ErasureReason::CustomerRequest)
        .await?
    {
        return Err(AppError::JobNotFound(id).into());
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(ErasureAccepted {
            id,
            erasure_requested: true,
        }),
    ))
}

/// A presigned download.
#[derive(Serialize, Deserialize, ToSchema, Debug)]
#[serde(rename_all = "camelCase")]
pub struct ArtifactLink {
    /// `kohya` or `diffusers`.
    pub format: String,
    /// Presigned GET URL.
    pub url: String,
    /// SHA-256 of the file.
    pub sha256: String,
    /// Size in bytes.
    pub bytes: i64,
}

/// The job's LoRA files.
#[derive(Serialize, Deserialize, ToSchema, Debug)]
#[serde(rename_all = "camelCase")]
pub struct Artifacts {
    /// Links.
    pub artifacts: Vec<ArtifactLink>,
    /// When the links stop working (RFC 3339).
    pub expires_at: String,
}

/// Presigned download links for the job's LoRA files.
#[utoipa::path(get, path = "/v1/jobs/{id}/artifacts", tag = "jobs", security(("bearer" = [])),
    params(("id" = String, Path)),
    responses((status = 200, body = Artifacts), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "the job has no artifacts yet"),
        (status = 410, body = ErrorBody, description = "erasure of the job was requested")))]
pub async fn artifacts(
    State(s): State<HttpState>,
    headers: HeaderMap,
    JobId(id): JobId,
) -> Result<Json<Artifacts>, ApiError> {
    let tenant = s.tenant(&headers)?;
    let job = s.app.get_job(&tenant.namespace, &id).await?;
    let status = job.status.clone().unwrap_or_default();
    // Once retention ends the job itself is gone (404); an erasure request closes the
    // downloads at once, before the operator has deleted anything.
    if job.spec.erasure.is_some() {
        return Err(ApiError::new(
            StatusCode::GONE,
            "artifacts_deleted",
            "erasure of the job was requested: its files are being deleted",
        ));
    }
    if status.artifacts.is_empty() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "artifacts_not_ready",
            "the job has no artifacts yet",
        ));
    }
    let (links, expires) = s.app.downloads(&job).await?;
    Ok(Json(Artifacts {
        artifacts: links
            .into_iter()
            .map(|d| ArtifactLink {
                format: d.format,
                url: d.url,
                sha256: d.sha256,
                bytes: d.bytes,
            })
            .collect(),
        expires_at: Timestamp::from_second(expires)
            .map(|t| t.to_string())
            .unwrap_or_default(),
    }))
}

/// One notification of a job and its delivery to the tenant's storefront.
#[derive(Serialize, Deserialize, ToSchema, Debug)]
#[serde(rename_all = "camelCase")]
pub struct EventRecord {
    /// The event id (`evt_…`) the storefront de-duplicates on.
    pub id: String,
    /// `job.accepted`, `job.running`, `job.progress`, `job.succeeded`, `job.failed`,
    /// `job.cancelled`, `job.refunded` or `job.erased`.
    #[serde(rename = "type")]
    pub kind: String,
    /// When it was recorded (Unix seconds).
    pub created: i64,
    /// The threshold crossed (progress events).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub percent: Option<u8>,
    /// The end reason code (failed and cancelled events).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// `pending`, `delivered` or `abandoned` (not delivered within three days).
    pub delivery: String,
    /// Delivery attempts so far.
    pub attempts: u32,
    /// The storefront's last HTTP status, if it answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_status: Option<u16>,
    /// When it was delivered (Unix seconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivered_at: Option<i64>,
}

/// A job's refund, when one was owed after it ended.
#[derive(Serialize, Deserialize, ToSchema, Debug)]
#[serde(rename_all = "camelCase")]
pub struct RefundRecord {
    /// `jobFailed` or `jobCancelled`.
    pub reason: String,
    /// `pending` or `succeeded`.
    pub state: String,
    /// Calls to Stripe so far.
    pub attempts: u32,
}

/// A job's delivery log.
#[derive(Serialize, Deserialize, ToSchema, Debug)]
#[serde(rename_all = "camelCase")]
pub struct JobEvents {
    /// Notifications, oldest first (empty when the tenant has no endpoint).
    pub events: Vec<EventRecord>,
    /// The refund, if one was owed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refund: Option<RefundRecord>,
}

fn enum_str<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// The job's notifications and their delivery to the storefront, and its refund: what the
/// storefront was told, when, and what is still being retried.
#[utoipa::path(get, path = "/v1/jobs/{id}/events", tag = "jobs", security(("bearer" = [])),
    params(("id" = String, Path)),
    responses((status = 200, body = JobEvents), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn job_events(
    State(s): State<HttpState>,
    headers: HeaderMap,
    JobId(id): JobId,
) -> Result<Json<JobEvents>, ApiError> {
    let tenant = s.tenant(&headers)?;
    // The job must be the tenant's; its ledger sits beside it.
    s.app.get_job(&tenant.namespace, &id).await?;
    let stored = crate::ledger::read(&s.app.kube, &tenant.namespace, &id)
        .await
        .map_err(AppError::from)?;
    let l = stored.ledger;
    Ok(Json(JobEvents {
        events: l
            .events
            .iter()
            .map(|e| EventRecord {
                id: e.id.clone(),
                kind: e.kind.as_str().to_string(),
                created: e.created,
                percent: e.percent,
                reason: e.reason.clone(),
                delivery: enum_str(&e.delivery),
                attempts: e.attempts,
                last_status: e.last_status,
                delivered_at: e.delivered_at,
            })
            .collect(),
        refund: l.refund.map(|r| RefundRecord {
            reason: enum_str(&r.reason),
            state: enum_str(&r.state),
            attempts: r.attempts,
        }),
    }))
}

/// Where a dataset should be uploaded.
#[derive(Serialize, Deserialize, ToSchema, Debug, Default)]
#[serde(rename_all = "camelCase")]
pub struct UploadRequest {
    /// `eea`, `us` or `any` (default): the upload goes to a region of that jurisdiction.
    #[serde(default)]
    pub residency: Option<String>,
    /// A preferred region; must satisfy the residency.
    #[serde(default)]
    pub region: Option<String>,
}

/// A presigned upload.
#[derive(Serialize, Deserialize, ToSchema, Debug)]
#[serde(rename_all = "camelCase")]
pub struct UploadTicket {
    /// The upload id to put in the order.
    pub upload_id: String,
    /// Presigned PUT URL for the dataset zip.
    pub url: String,
    /// Always `PUT`.
    pub method: String,
    /// When the URL stops working (RFC 3339).
    pub expires_at: String,
    /// Largest accepted zip.
    pub max_bytes: u64,
}

/// Creates an upload slot in the region the residency requires.
#[utoipa::path(post, path = "/v1/uploads", tag = "uploads", security(("bearer" = [])),
    request_body = UploadRequest,
    responses((status = 201, body = UploadTicket), (status = 401, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn create_upload(
    State(s): State<HttpState>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<UploadTicket>), ApiError> {
    let tenant = s.tenant(&headers)?;
    let bytes = read_body(body, s.app.config.limits.json_max_bytes).await?;
    let req: UploadRequest = if bytes.is_empty() {
        UploadRequest::default()
    } else {
        parse_json(&bytes)?
    };
    let residency =
        parse_residency(req.residency.as_deref().unwrap_or("any")).ok_or_else(|| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "order_field_invalid",
                "residency must be eea, us or any",
            )
        })?;
    let platform = &s.app.platform;
    let region = match &req.region {
        Some(name) => platform
            .region(name)
            .filter(|r| r.jurisdiction.allows(residency))
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "region_not_allowed",
                    format!("region {name:?} is unknown or outside the residency"),
                )
            })?,
        None => platform
            .regions
            .iter()
            .find(|r| r.jurisdiction.allows(residency))
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "region_not_allowed",
                    "no region serves this residency",
                )
            })?,
    };
    let upload = UploadId {
        region: region.name.clone(),
        token: uuid::Uuid::new_v4().simple().to_string(),
    };
    let secs = s.app.config.limits.presign_seconds;
    let url = s
        .app
        .storage
        .presign_put(
            &region.buckets.datasets,
            &upload.key(&tenant.namespace),
            Duration::from_secs(secs),
        )
        .await
        .map_err(AppError::from)?;
    let expires = Timestamp::now().as_second() + secs as i64;
    Ok((
        StatusCode::CREATED,
        Json(UploadTicket {
            upload_id: upload.to_id(),
            url,
            method: "PUT".into(),
            expires_at: Timestamp::from_second(expires)
                .map(|t| t.to_string())
                .unwrap_or_default(),
            max_bytes: s.app.dataset_rules().max_zip_bytes,
        }),
    ))
}

/// A validated dataset.
#[derive(Serialize, Deserialize, ToSchema, Debug)]
#[serde(rename_all = "camelCase")]
pub struct UploadCheck {
    /// The upload id.
    pub upload_id: String,
    /// SHA-256 of the zip.
    pub sha256: String,
    /// Pass this with the order (`datasetReceipt` in the draft order or the job request): job
    /// creation then trusts this check instead of asking S3 again. Valid
    /// for 24 hours, for this tenant and upload; re-uploading makes the job fail at start.
    pub receipt: String,
}

/// Validates an uploaded dataset now and marks it, so job creation need not download it again.
#[utoipa::path(post, path = "/v1/uploads/{id}/validate", tag = "uploads", security(("bearer" = [])),
    params(("id" = String, Path)),
    responses((status = 200, body = UploadCheck), (status = 401, body = ErrorBody),
        (status = 422, body = ErrorBody, description = "the dataset is unusable; the code says why")))]
pub async fn validate_upload(
    State(s): State<HttpState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<UploadCheck>, ApiError> {
    let tenant = s.tenant(&headers)?;
    let sha = s.app.validate_upload(&tenant.namespace, &id, None).await?;
    let receipt = s.app.dataset_receipt(&tenant.namespace, &id, &sha);
    Ok(Json(UploadCheck {
        upload_id: id,
        sha256: sha,
        receipt,
    }))
}

async fn healthz() -> &'static str {
    "ok"
}

/// Ready when the apiserver answers. The answer is reused for a second, so a flood of
/// probes costs the apiserver one request a second at most.
async fn readyz(State(s): State<HttpState>) -> Result<&'static str, ApiError> {
    let fresh = |at: &Option<(Instant, bool)>| {
        at.filter(|(t, _)| t.elapsed() < READY_CACHE)
            .map(|(_, ok)| ok)
    };
    let cached = s.ready.lock().ok().and_then(|g| fresh(&g));
    let ok = match cached {
        Some(ok) => ok,
        None => {
            let ok = s.app.kube.apiserver_version().await.is_ok();
            if let Ok(mut g) = s.ready.lock() {
                *g = Some((Instant::now(), ok));
            }
            ok
        }
    };
    if !ok {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "the Kubernetes API is unreachable",
        ));
    }
    Ok("ok")
}

/// How long a readiness answer is reused.
const READY_CACHE: std::time::Duration = std::time::Duration::from_secs(1);

async fn metrics(State(s): State<HttpState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.app.metrics.render(),
    )
}

async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The OpenAPI document, generated from the handlers.
#[derive(OpenApi)]
#[openapi(
    info(title = "loraplane API", description = "Paid orders into LoRA training jobs, uploads, downloads and erasure.

The order flow of a storefront: `POST /v1/uploads` and a PUT of the dataset zip to the presigned URL, \
`POST /v1/uploads/{id}/validate` (a receipt), `POST /v1/orders` (a draft holding everything the customer chose, \
in the upload's region; answers `orderId` and the `price`), then a Stripe Checkout Session created by the storefront \
at that price with only `metadata.order_id`. Stripe calls `POST /v1/webhooks/stripe`: the paid draft becomes a job \
(a wrong price, or an order that cannot be served, is refunded). From then on the tenant's notification endpoint \
receives `Notification` events (schema below) signed as Stripe signs its own (`Loraplane-Signature: t=…,v1=…`, \
verifiable with `stripe.Webhook.construct_event`), at least once and in order per job; `GET /v1/jobs/{id}/events` \
is the delivery log. A paid job that fails, or that the platform cancels, is refunded (`job.refunded`). \
`GET /v1/jobs/{id}/artifacts` (or the `job.succeeded` event) has the download links."),
    components(schemas(crate::outbox::Notification)),
    paths(stripe_webhook, create_order, create_job, get_job, list_jobs, cancel_job, withdraw_consent, erase_job, artifacts, job_events, create_upload, validate_upload),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

async fn request_context(State(s): State<HttpState>, req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() <= 64 && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    // Any token is a valid HTTP method: only a fixed set may become a label or a log field.
    let method = method_label(req.method());
    let ip = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| {
        let forwarded = req
            .headers()
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok());
        client_ip::client_ip(c.0.ip(), forwarded, &s.trusted_proxies).to_string()
    });
    let started = std::time::Instant::now();
    // Liveness probes and scrapes cost nothing and are not customers; `/readyz` asks the
    // apiserver (at most once a second), so it is throttled like any call.
    let limited = !matches!(route.as_str(), "/healthz" | "/metrics");
    let span = tracing::info_span!("request", request_id = %id, %route, %method);
    let mut resp = if let (true, Some(ip)) = (limited, &ip) {
        match s
            .limiter
            .check(&format!("ip:{ip}"), s.app.config.limits.ip_rps)
        {
            Ok(()) => tracing::Instrument::instrument(next.run(req), span.clone()).await,
            Err(secs) => rate_limited(secs).into_response(),
        }
    } else {
        tracing::Instrument::instrument(next.run(req), span.clone()).await
    };
    if let Some(rewritten) = json_errors(resp.status(), &mut resp).await {
        resp = rewritten;
    }
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    let status = resp.status();
    s.app
        .metrics
        .requests
        .with_label_values(&[route.as_str(), method, status.as_str()])
        .inc();
    s.app
        .metrics
        .request_duration
        .with_label_values(&[route.as_str()])
        .observe(started.elapsed().as_secs_f64());
    span.in_scope(|| tracing::info!(status = status.as_u16(), "request served"));
    resp
}

/// The method as a metric label and log field: one of a fixed set, `OTHER` for the rest.
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

/// Rewrites a non-JSON error (axum rejections, unknown routes) into the JSON error shape.
async fn json_errors(status: StatusCode, resp: &mut Response) -> Option<Response> {
    if !(status.is_client_error() || status.is_server_error()) {
        return None;
    }
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json {
        return None;
    }
    let body = std::mem::replace(resp.body_mut(), Body::empty());
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let message = String::from_utf8_lossy(&text).trim().to_string();
    let code = match status {
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        _ if status.is_server_error() => "internal",
        _ => "bad_request",
    };
    let message = if message.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        message
    };
    let mut out = ApiError::new(status, code, message).into_response();
    for (k, v) in resp.headers() {
        if k != header::CONTENT_TYPE && k != header::CONTENT_LENGTH {
            out.headers_mut().insert(k.clone(), v.clone());
        }
    }
    Some(out)
}

/// Every route, for the router and the OpenAPI consistency test.
pub const ROUTES: &[(&str, &str)] = &[
    ("post", "/v1/webhooks/stripe"),
    ("post", "/v1/orders"),
    ("post", "/v1/jobs"),
    ("get", "/v1/jobs"),
    ("get", "/v1/jobs/{id}"),
    ("delete", "/v1/jobs/{id}"),
    ("post", "/v1/jobs/{id}/cancel"),
    ("post", "/v1/jobs/{id}/consent/withdraw"),
    ("get", "/v1/jobs/{id}/artifacts"),
    ("get", "/v1/jobs/{id}/events"),
    ("post", "/v1/uploads"),
    ("post", "/v1/uploads/{id}/validate"),
];

/// Serves the API on `listener` until `shutdown` completes: the server `main` runs, and the
/// tests and bench run too.
///
/// Connections are bounded by hyper's and tower-http's own settings, from `limits`: at most
/// `maxConnections` open (past that, new ones wait in the kernel's backlog and cost nothing
/// here), a request's headers must arrive within `headerTimeoutSeconds` of the connection
/// opening or of the previous response (so a slowloris client, or an idle keep-alive one, is
/// dropped), and its body within `bodyTimeoutSeconds`. On shutdown each connection finishes
/// the request it is serving, then closes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Arc<App>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tower::Service;

    let limits = app.config.limits.clone();
    let max = limits.max_connections.max(1);
    let slots = Arc::new(tokio::sync::Semaphore::new(max));
    let router =
        router(HttpState::new(app)).layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            Duration::from_secs(limits.body_timeout_seconds),
        ));
    let header_timeout = Duration::from_secs(limits.header_timeout_seconds);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.map_err(std::io::Error::other)?,
            () = &mut shutdown => break,
        };
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                // Out of file descriptors and the like: wait rather than spin.
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Responses are small and written whole; without NODELAY a keep-alive client can wait
        // on Nagle's algorithm against its delayed ACK.
        let _ = tcp.set_nodelay(true);
        let router = router.clone();
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service =
                hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(ConnectInfo(peer));
                    router.clone().call(req)
                });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(tcp), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stopped.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    let _ = stop.send(true);
    // Every slot back means every connection has finished.
    let _ = slots
        .acquire_many(u32::try_from(max).unwrap_or(u32::MAX))
        .await;
    Ok(())
}

/// The router.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/v1/webhooks/stripe", post(stripe_webhook))
        .route("/v1/orders", post(create_order))
        .route("/v1/jobs", post(create_job).get(list_jobs))
        .route("/v1/jobs/{id}", get(get_job).delete(erase_job))
        .route("/v1/jobs/{id}/cancel", post(cancel_job))
        .route("/v1/jobs/{id}/consent/withdraw", post(withdraw_consent))
        .route("/v1/jobs/{id}/artifacts", get(artifacts))
        .route("/v1/jobs/{id}/events", get(job_events))
        .route("/v1/uploads", post(create_upload))
        .route("/v1/uploads/{id}/validate", post(validate_upload))
        .route("/openapi.json", get(openapi_json))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            request_context,
        ))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use loraplane_dataset::Entry;

    #[test]
    fn the_openapi_document_lists_exactly_the_routes() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        let mut documented = Vec::new();
        for (path, ops) in paths {
            for method in ops.as_object().unwrap().keys() {
                documented.push((method.clone(), path.clone()));
            }
        }
        documented.sort();
        let mut routed: Vec<(String, String)> = ROUTES
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        routed.sort();
        assert_eq!(documented, routed);
        assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
        // What the storefront receives is documented too, though no route returns it.
        let schemas = &doc["components"]["schemas"];
        assert!(
            schemas["Notification"]["properties"]["data"].is_object(),
            "{schemas}"
        );
        assert!(
            doc["info"]["description"]
                .as_str()
                .unwrap()
                .contains("construct_event")
        );
    }

    #[test]
    fn the_rate_limiter_allows_a_burst_then_asks_to_wait() {
        let l = RateLimiter::default();
        for _ in 0..4 {
            assert_eq!(l.check("t", 2.0), Ok(()));
        }
        assert_eq!(l.check("t", 2.0), Err(1));
        assert_eq!(l.check("other", 2.0), Ok(()));
    }

    #[test]
    fn errors_have_the_documented_shape() {
        let e: ApiError = AppError::JobNotFound("x".into()).into();
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        assert_eq!(e.code, "job_not_found");
        let entry = Entry {
            number: 3,
            name: "../a".into(),
        };
        let z: ApiError = AppError::Upload(DatasetError::UnsafePath { entry }).into();
        assert_eq!(z.code, "upload_unsafe_path");
        // The uploader is told the file's name; the message's own text names the number.
        assert!(
            z.message.starts_with("entry #3: unsafe path"),
            "{}",
            z.message
        );
        assert!(z.message.ends_with("(file \"../a\")"), "{}", z.message);
    }

    proptest::proptest! {
        /// The job-id check accepts exactly Kubernetes object names (DNS-1123 subdomains as the
        /// apiserver's own regex states them, up to 253 characters) and nothing else.
        #[test]
        fn job_ids_are_exactly_object_names(id in proptest::prop_oneof![
            "[a-z0-9.\\-]{0,260}",
            "[a-z0-9.\\-/?%#A-Z\u{00e9}\u{202e} ]{0,40}",
        ]) {
            let reference = regex::Regex::new(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$").unwrap();
            proptest::prop_assert_eq!(is_object_name(&id), id.len() <= 253 && reference.is_match(&id));
        }
    }
}
