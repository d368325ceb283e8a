//! A tenant's jobs: read, list, cancel, withdraw consent, erase, download links and the
//! notification log, with the DTOs beside their routes.

use super::*;
use loraplane_crds::v1alpha1::SampleKind;

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
pub(super) fn is_object_name(s: &str) -> bool {
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

/// A sample image, or the contact sheet of them all.
#[derive(Serialize, Deserialize, ToSchema, Debug)]
#[serde(rename_all = "camelCase")]
pub struct SampleLink {
    /// `image` or `contactSheet`.
    pub kind: String,
    /// The training step it shows (0: the base model, before training); for the contact
    /// sheet, the newest set's.
    pub step: i64,
    /// The prompt's index; absent for the contact sheet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<i32>,
    /// Presigned GET URL of the PNG.
    pub url: String,
}

/// The job's sample images so far.
#[derive(Serialize, Deserialize, ToSchema, Debug)]
#[serde(rename_all = "camelCase")]
pub struct Samples {
    /// Links, in training order, the contact sheet last.
    pub samples: Vec<SampleLink>,
    /// When the links stop working (RFC 3339).
    pub expires_at: String,
}

/// Presigned links to the images the trainer rendered while training (the job's
/// `spec.samples`): one per prompt before training and at each sampled step, and the contact
/// sheet of them all. They are the job's outputs: retention and erasure delete them with the
/// LoRA files.
#[utoipa::path(get, path = "/v1/jobs/{id}/samples", tag = "jobs", security(("bearer" = [])),
    params(("id" = String, Path)),
    responses((status = 200, body = Samples), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody, description = "no such job, or it renders no samples (`samples_off`)"),
        (status = 409, body = ErrorBody, description = "the job has rendered no samples yet"),
        (status = 410, body = ErrorBody, description = "erasure of the job was requested")))]
pub async fn samples(
    State(s): State<HttpState>,
    headers: HeaderMap,
    JobId(id): JobId,
) -> Result<Json<Samples>, ApiError> {
    let tenant = s.tenant(&headers)?;
    let job = s.app.get_job(&tenant.namespace, &id).await?;
    if job.spec.erasure.is_some() {
        return Err(ApiError::new(
            StatusCode::GONE,
            "samples_deleted",
            "erasure of the job was requested: its files are being deleted",
        ));
    }
    if job.spec.samples.is_none() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "samples_off",
            "the job renders no samples (its plan turns them off)",
        ));
    }
    let (links, expires) = s.app.sample_links(&job).await?;
    if links.is_empty() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "samples_not_ready",
            "the job has rendered no samples yet",
        ));
    }
    Ok(Json(Samples {
        samples: links
            .into_iter()
            .map(|(a, url)| SampleLink {
                kind: match a.kind {
                    SampleKind::Image => "image",
                    SampleKind::ContactSheet => "contactSheet",
                }
                .into(),
                step: a.step,
                prompt: a.prompt,
                url,
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
                delivery: e.delivery.as_str().to_string(),
                attempts: e.attempts,
                last_status: e.last_status,
                delivered_at: e.delivered_at,
            })
            .collect(),
        refund: l.refund.map(|r| RefundRecord {
            reason: r.reason.as_str().to_string(),
            state: r.state.as_str().to_string(),
            attempts: r.attempts,
        }),
    }))
}
