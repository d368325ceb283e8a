//! Uploads: a presigned PUT to a region the residency allows, and the dataset check that
//! answers a receipt.

use super::*;

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
