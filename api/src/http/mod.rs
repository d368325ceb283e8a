//! The HTTP surface: routing, middleware (authentication, rate limits, request ids, JSON errors,
//! metrics) and the OpenAPI document generated from the handlers' annotations. The handlers
//! live by resource (`orders`, `jobs`, `uploads`), each translating HTTP to `App` calls with its
//! DTOs beside it; `error` maps `AppError` to HTTP.
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

mod error;
mod jobs;
mod orders;
mod uploads;

pub use error::*;
pub use jobs::*;
pub use orders::*;
pub use uploads::*;

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
    paths(stripe_webhook, create_order, create_job, get_job, list_jobs, cancel_job, withdraw_consent, erase_job, artifacts, samples, job_events, create_upload, validate_upload),
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
    ("get", "/v1/jobs/{id}/samples"),
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
        .route("/v1/jobs/{id}/samples", get(samples))
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
