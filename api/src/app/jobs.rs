//! Intent on a tenant's jobs: read, list, cancel, withdraw consent, erase; and the
//! download links of a finished job's LoRA files and of its sample images.

use super::*;
use loraplane_crds::v1alpha1::SampleArtifact;

impl App {
    /// Presigned links to a job's LoRA files, and when they stop working (Unix seconds). Only
    /// the job's own files: status is the operator's, but the names in it came from a trainer,
    /// and a presigned link is a download for whoever holds it.
    pub async fn downloads(
        &self,
        job: &LoRATrainingJob,
    ) -> Result<(Vec<outbox::Download>, i64), AppError> {
        let mut links = Vec::new();
        for a in job.status.iter().flat_map(|s| &s.artifacts) {
            if let Some(url) = self.presign_output(job, &a.uri).await? {
                links.push(outbox::Download {
                    format: a.format.clone(),
                    url,
                    sha256: a.sha256.clone(),
                    bytes: a.bytes,
                });
            }
        }
        Ok((links, self.link_expiry()))
    }

    /// Presigned links to a job's sample images and their contact sheet (`status.samples`,
    /// in training order), and when they stop working; like [`App::downloads`], only the
    /// job's own files.
    pub async fn sample_links(
        &self,
        job: &LoRATrainingJob,
    ) -> Result<(Vec<(SampleArtifact, String)>, i64), AppError> {
        let mut links = Vec::new();
        for a in job.status.iter().flat_map(|s| &s.samples) {
            if let Some(url) = self.presign_output(job, &a.uri).await? {
                links.push((a.clone(), url));
            }
        }
        Ok((links, self.link_expiry()))
    }

    /// A presigned GET of `uri` when it is one of the job's own outputs, else `None`.
    async fn presign_output(
        &self,
        job: &LoRATrainingJob,
        uri: &str,
    ) -> Result<Option<String>, AppError> {
        let prefix = loraplane_crds::layout::job_prefix(
            &job.namespace().unwrap_or_default(),
            &job.name_any(),
            job.metadata.uid.as_deref().unwrap_or_default(),
        );
        if !self.storage.is_job_output(uri, &prefix) {
            return Ok(None);
        }
        let (bucket, key) = parse_uri(uri)?;
        let lifetime = std::time::Duration::from_secs(self.config.limits.presign_seconds);
        Ok(Some(self.storage.presign_get(bucket, key, lifetime).await?))
    }

    /// When links presigned now stop working (Unix seconds).
    fn link_expiry(&self) -> i64 {
        let secs = self.config.limits.presign_seconds;
        Timestamp::now().as_second() + i64::try_from(secs).unwrap_or(i64::MAX / 2)
    }

    /// Gets a job in a namespace.
    pub async fn get_job(&self, ns: &str, name: &str) -> Result<LoRATrainingJob, AppError> {
        self.jobs(ns)
            .get_opt(name)
            .await
            .map_err(kube_err("get job"))?
            .ok_or_else(|| AppError::JobNotFound(name.into()))
    }

    /// Lists a namespace's jobs, a page at a time.
    pub async fn list_jobs(
        &self,
        ns: &str,
        limit: u32,
        continue_token: Option<String>,
    ) -> Result<(Vec<LoRATrainingJob>, Option<String>), AppError> {
        let mut lp = ListParams::default().limit(limit);
        if let Some(c) = continue_token {
            lp = lp.continue_token(&c);
        }
        let list = match self.jobs(ns).list(&lp).await {
            Ok(list) => list,
            // The apiserver answers a malformed token 400 and an expired one 410.
            Err(e) if is_status(&e, 400) || is_status(&e, 410) => {
                return Err(AppError::BadContinue);
            }
            Err(e) => return Err(kube_err("list jobs")(e)),
        };
        let next = list.metadata.continue_.filter(|c| !c.is_empty());
        Ok((list.items, next))
    }

    /// Cancels a job: sets `spec.cancel` (one-way), and the operator stops it for good. A job
    /// that has already ended is returned as it is.
    pub async fn cancel(&self, ns: &str, name: &str) -> Result<LoRATrainingJob, AppError> {
        let job = self.get_job(ns, name).await?;
        let ended = job
            .status
            .as_ref()
            .and_then(|s| s.phase)
            .is_some_and(|p| p.is_terminal());
        if ended || job.spec.cancel {
            return Ok(job);
        }
        self.jobs(ns)
            .patch(
                name,
                &PatchParams::default(),
                // The customer's own cancel owes no refund; one without this mark (a
                // platform team's) does.
                &Patch::Merge(json!({
                    "metadata": {"annotations": {outbox::ANNOTATION_CANCELLED_BY: outbox::CANCELLED_BY_CUSTOMER}},
                    "spec": {"cancel": true},
                })),
            )
            .await
            .map_err(kube_err("cancel job"))
    }

    /// Withdraws the customer's training consent: sets `spec.dataUse.consentWithdrawn`
    /// (one-way), and the operator deletes the job's copy in the consented corpus (or never
    /// makes it). A job ordered without consent is returned as it is.
    pub async fn withdraw_consent(
        &self,
        ns: &str,
        name: &str,
    ) -> Result<LoRATrainingJob, AppError> {
        let job = self.get_job(ns, name).await?;
        if !job.spec.data_use.training_consent || job.spec.data_use.consent_withdrawn {
            return Ok(job);
        }
        self.jobs(ns)
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"dataUse": {"consentWithdrawn": true}}})),
            )
            .await
            .map_err(kube_err("withdraw consent"))
    }

    /// Requests the erasure of every byte of a job: records the request for the order (so a
    /// replayed order cannot recreate the job), then writes `spec.erasure` (one-way). The
    /// operator stops the job, deletes its data and the job, and leaves the audit record.
    /// Returns false when there is no such job (any more).
    pub async fn erase(
        &self,
        ns: &str,
        name: &str,
        reason: ErasureReason,
    ) -> Result<bool, AppError> {
        let Some(job) = self
            .jobs(ns)
            .get_opt(name)
            .await
            .map_err(kube_err("get job"))?
        else {
            return Ok(false);
        };
        if job.spec.erasure.is_some() {
            return Ok(true);
        }
        let order_hash = job
            .labels()
            .get(LABEL_ORDER)
            .cloned()
            .unwrap_or_else(|| name.to_string());
        let requested = Timestamp::now();
        self.write_tombstone(
            ns,
            &erased_name(&order_hash),
            &order_hash,
            BTreeMap::from([
                ("reason".to_string(), reason.as_str().to_string()),
                ("requestedAt".to_string(), requested.to_string()),
            ]),
        )
        .await?;
        let request = ErasureRequest {
            requested_at: Time(requested),
            reason,
        };
        match self
            .jobs(ns)
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"erasure": request}})),
            )
            .await
        {
            Ok(_) => {}
            // Already being deleted (or gone): the operator's purge takes its data anyway.
            Err(e) if is_status(&e, 404) => return Ok(false),
            // An earlier request won the race; the first request stands.
            Err(e) if is_status(&e, 422) => {}
            Err(e) => return Err(kube_err("request erasure")(e)),
        }
        self.metrics
            .erasure_requests
            .with_label_values(&[reason.as_str()])
            .inc();
        tracing::info!(
            namespace = ns,
            job = name,
            reason = reason.as_str(),
            "erasure requested"
        );
        Ok(true)
    }
}
