//! The HTTP front: one axum handler for every request that applies the injected faults
//! (latency, errors on writes) and hands the rest to the route table (`routes`).

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{Method, header};
use axum::response::Response;

use super::audit::Audit;
use super::faults::Faults;
use super::meta::ApiError;
use super::ops::ApiState;
use super::request::{Ctx, error_response, header_str};
use super::routes;
use crate::logs::PodLogs;

/// The router serving everything through one handler.
pub(crate) fn router(
    state: Arc<ApiState>,
    faults: Arc<Faults>,
    logs: PodLogs,
    audit: Arc<Audit>,
) -> Router {
    Router::new().fallback(handle).with_state(Ctx {
        state,
        faults,
        logs,
        audit,
    })
}

/// The error a fault injected with this code answers, worded like kube-apiserver's.
fn injected_error(code: u16) -> ApiError {
    match code {
        429 => ApiError::new(
            429,
            "TooManyRequests",
            "kube-sim: injected fault: too many requests, please try again later",
        ),
        409 => ApiError::new(
            409,
            "Conflict",
            "kube-sim: injected fault: Operation cannot be fulfilled: the object has been modified; please apply your changes to the latest version and try again",
        ),
        503 => ApiError::new(
            503,
            "ServiceUnavailable",
            "kube-sim: injected fault: service unavailable",
        ),
        _ => ApiError::new(
            500,
            "InternalError",
            "kube-sim: injected fault: an error on the server has prevented the request from succeeding",
        ),
    }
}

async fn handle(State(ctx): State<Ctx>, req: Request) -> Response {
    let write = matches!(
        *req.method(),
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    );
    let user_agent = header_str(req.headers(), header::USER_AGENT);
    let (latency, injected) = ctx.faults.decide(write, user_agent);
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    if let Some(code) = injected {
        return error_response(&injected_error(code));
    }
    match routes::dispatch(&ctx, req).await {
        Ok(resp) => resp,
        Err(e) => error_response(&e),
    }
}
