//! Errors as the API answers them: `{"error": {"code", "message"}}` with the HTTP status each
//! `AppError` maps to, and the request-body helpers that fail with one.

use super::*;

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

pub(super) fn rate_limited(secs: u64) -> ApiError {
    ApiError {
        retry_after: Some(secs),
        ..ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many requests; retry later",
        )
    }
}

pub(super) async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the request body exceeds {limit} bytes"),
        )
    })
}

pub(super) fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        // serde's message names the field and position, never echoes values.
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", e.to_string())
    })
}
