//! Uploads: the dataset check where the zip lies, its marker and the receipt.

use super::*;

impl App {
    /// The receipt for an upload that just passed, for the storefront to carry into the order.
    pub fn dataset_receipt(&self, ns: &str, upload_id: &str, sha256: &str) -> String {
        receipt::issue(
            &self.secrets.id_key,
            ns,
            upload_id,
            self.dataset_rules(),
            sha256,
            Timestamp::now().as_second(),
        )
    }

    /// Validates an upload and returns its SHA-256. A genuine receipt from an earlier check
    /// answers without a request; otherwise the marker on the object, or the bytes themselves.
    pub async fn validate_upload(
        &self,
        ns: &str,
        upload_id: &str,
        receipt: Option<&str>,
    ) -> Result<String, AppError> {
        let upload =
            UploadId::parse(upload_id).ok_or_else(|| AppError::BadUploadId(upload_id.into()))?;
        let rules = *self.dataset_rules();
        if let Some(sha) = receipt.and_then(|r| {
            receipt::verify(
                &self.secrets.id_key,
                r,
                ns,
                upload_id,
                &rules,
                Timestamp::now().as_second(),
            )
        }) {
            self.metrics
                .dataset_checks
                .with_label_values(&["receipt"])
                .inc();
            return Ok(sha.to_string());
        }
        let bucket = self
            .dataset_bucket(&upload.region)
            .ok_or_else(|| AppError::BadUploadId(upload_id.into()))?;
        let key = upload.key(ns);
        // An upload is checked once: a passing check leaves a marker on the object, and S3
        // drops it if the object is replaced. The marker costs one small request instead of a
        // download and an inflate per order, on whichever replica the order lands.
        match self
            .storage
            .validation_marker(&upload.region, &bucket, &key)
            .await?
        {
            Marker::Missing => return Err(AppError::UploadNotFound(upload_id.into())),
            Marker::Marked(m) => {
                if let Some(sha) = dataset_check::vouched_sha256(&rules, &m) {
                    self.metrics
                        .dataset_checks
                        .with_label_values(&["marker"])
                        .inc();
                    return Ok(sha.to_string());
                }
            }
            Marker::Unmarked => {}
        }
        let object = self.storage.object(&upload.region, &bucket, &key)?;
        let Some(stat) = object.stat().await? else {
            return Err(AppError::UploadNotFound(upload_id.into()));
        };
        if stat.size > rules.max_zip_bytes {
            // A presigned PUT cannot bound its body, so the bound is kept here: the oversized
            // object goes now rather than waiting for the upload sweep.
            if let Err(e) = self.storage.delete_object(&bucket, &key).await {
                tracing::warn!(error = %e, "could not delete an oversized upload");
            }
            return Err(DatasetError::ZipTooLarge {
                size: stat.size,
                limit: rules.max_zip_bytes,
            }
            .into());
        }
        // A check holds an entry and a decoded image in memory: the permit bounds how many run
        // at once. It moves into the blocking task, so a client that hangs up does not free it
        // before the memory is.
        let permit = self
            .validations
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| AppError::CheckDataset)?;
        self.metrics
            .dataset_checks
            .with_label_values(&["download"])
            .inc();
        let runtime = tokio::runtime::Handle::current();
        let checked = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            dataset_check::check_object(runtime, object, stat.etag, stat.size, &rules)
        })
        .await
        .map_err(|_| AppError::CheckDataset)?;
        let sha = checked.map_err(|e| match e {
            CheckError::Invalid(e) => AppError::Upload(e),
            CheckError::Read(e) => AppError::Storage(e),
        })?;
        // Should the object be replaced between our read and this write, the marker names the
        // old bytes' hash, which the job spec pins and the trainer verifies before unpacking:
        // the replacement is refused at start, never trained on unchecked.
        if let Err(e) = self
            .storage
            .set_validation_marker(
                &upload.region,
                &bucket,
                &key,
                &dataset_check::marker(&rules, &sha),
            )
            .await
        {
            // Only an optimisation is lost: the next order checks the bytes again.
            tracing::warn!(error = %e, "could not record the dataset's validation");
        }
        Ok(sha)
    }
}
