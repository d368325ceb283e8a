//! Orders into jobs: the paid webhook (drafts, price check, refunds, tombstones), draft
//! orders, service-API jobs, and the upload claim that makes one upload one order.

use super::*;

/// Why a paid draft cannot be fulfilled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PaidDraft {
    /// Its id is malformed, or it expired or never existed.
    Gone,
    /// The checkout charged another amount or currency than the draft quoted.
    WrongPrice,
}

/// Who holds an upload's claim, as [`App::claim_upload`] finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Claim {
    /// This order holds it (just created, or from an earlier delivery).
    Ours,
    /// Another order holds it.
    Theirs,
}

fn erasure_reason(r: RevokeReason) -> ErasureReason {
    match r {
        RevokeReason::Refund => ErasureReason::Refund,
        RevokeReason::Dispute => ErasureReason::Dispute,
    }
}

impl App {
    /// Creates the job of an order, or returns the existing one (`false`).
    pub async fn create_job(
        &self,
        ns: &str,
        order: &Order,
        ids: &OrderIds,
    ) -> Result<(LoRATrainingJob, bool), AppError> {
        let name = order::job_name(&ids.order_hash);
        let api = self.jobs(ns);
        // The revocation lookup and the dataset check (a receipt, or a marker read) are
        // independent: run them together. No lookup of an existing job first: `create`
        // answers that (409), and a redelivery only costs the same lookup and check.
        let (revoked, spec) = tokio::join!(self.revoked(ns, ids), self.job_spec(ns, order));
        if let Some(why) = revoked? {
            return Err(AppError::Revoked(why));
        }
        let spec = match spec {
            Ok(spec) => spec,
            Err(e) => {
                // A redelivery of an order whose dataset retention already deleted (or whose
                // plan changed since) still has its job.
                if let Some(existing) = api.get_opt(&name).await.map_err(kube_err("get job"))? {
                    return Ok((existing, false));
                }
                return Err(e);
            }
        };
        // One upload, one order: the claim is created before the job, so of two orders on one
        // upload exactly one gets it (the apiserver's create is the arbiter).
        let claim = upload_claim_name(&spec.dataset.uri);
        if self.claim_upload(ns, &claim, &ids.order_hash).await? == Claim::Theirs {
            return Err(AppError::UploadConsumed(order.upload_id.clone()));
        }
        let mut job = LoRATrainingJob::new(&name, spec);
        job.metadata.namespace = Some(ns.to_string());
        let mut labels = BTreeMap::from([
            (LABEL_ORDER.to_string(), ids.order_hash.clone()),
            (LABEL_SOURCE.to_string(), ids.source.to_string()),
            (LABEL_PLAN.to_string(), order.plan.clone()),
            (LABEL_MANAGED_BY.to_string(), "loraplane-api".to_string()),
        ]);
        if let Some(p) = &ids.payment_hash {
            labels.insert(LABEL_PAYMENT.to_string(), p.clone());
        }
        if let Some((key, body)) = &ids.idempotency {
            labels.insert(LABEL_IDEMPOTENCY.to_string(), key.clone());
            job.metadata.annotations = Some(BTreeMap::from([(
                ANNOTATION_REQUEST.to_string(),
                body.clone(),
            )]));
        }
        job.metadata.labels = Some(labels);
        // What the API owes after the job exists (a refund, notifications) keeps the job
        // until it is paid out; see `notifier`.
        if self.owes_after_job(ns, ids) {
            job.metadata.finalizers = Some(vec![outbox::FINALIZER.to_string()]);
        }
        match api.create(&PostParams::default(), &job).await {
            Ok(created) => Ok((created, true)),
            Err(e) if is_status(&e, 409) => {
                let existing = api.get(&name).await.map_err(kube_err("get job"))?;
                Ok((existing, false))
            }
            Err(e) => Err(kube_err("create job")(e)),
        }
    }

    /// Claims an upload for an order: the Lease `claim` (see
    /// `loraplane_crds::layout::upload_claim_name`) held by the order's hash. A Lease, not a
    /// ConfigMap: the tombstone lookups list the namespace's ConfigMaps on every order, and a
    /// claim per order there would make each of them slower. Claiming twice for the same
    /// order is harmless (a redelivery); for another order it is refused.
    async fn claim_upload(
        &self,
        ns: &str,
        claim: &str,
        order_hash: &str,
    ) -> Result<Claim, AppError> {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(claim.to_string()),
                namespace: Some(ns.to_string()),
                labels: Some(BTreeMap::from([
                    (LABEL_MANAGED_BY.to_string(), "loraplane-api".to_string()),
                    (LABEL_RECORD.to_string(), UPLOAD_CLAIM_RECORD.to_string()),
                ])),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(order_hash.to_string()),
                ..LeaseSpec::default()
            }),
        };
        let holder = match self.leases(ns).create(&PostParams::default(), &lease).await {
            Ok(_) => return Ok(Claim::Ours),
            Err(e) if is_status(&e, 409) => self.claim_holder(ns, claim).await?,
            Err(e) => return Err(kube_err("create upload claim")(e)),
        };
        Ok(if holder.as_deref() == Some(order_hash) {
            Claim::Ours
        } else {
            Claim::Theirs
        })
    }

    /// The order hash holding a claim, if the claim exists.
    async fn claim_holder(&self, ns: &str, claim: &str) -> Result<Option<String>, AppError> {
        Ok(self
            .leases(ns)
            .get_opt(claim)
            .await
            .map_err(kube_err("get upload claim"))?
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity))
    }

    /// The spec of an order: its plan's policy (cheap checks first) and its validated dataset.
    async fn job_spec(&self, ns: &str, order: &Order) -> Result<LoRATrainingJobSpec, AppError> {
        let plan = self
            .config
            .plans
            .get(&order.plan)
            .ok_or_else(|| OrderError::UnknownPlan(order.plan.clone()))?;
        let upload = UploadId::parse(&order.upload_id)
            .ok_or_else(|| AppError::BadUploadId(order.upload_id.clone()))?;
        let bucket = self
            .dataset_bucket(&upload.region)
            .ok_or_else(|| AppError::BadUploadId(order.upload_id.clone()))?;
        // Policy first (cheap), then the dataset (a marker read, or a download and inflate).
        let placeholder = "0".repeat(64);
        let mut spec = order::build_spec(
            order,
            &SpecInputs {
                plan,
                platform: &self.platform,
                upload: &upload,
                dataset_bucket: &bucket,
                namespace: ns,
                dataset_sha256: &placeholder,
            },
        )?;
        spec.dataset.sha256 = self
            .validate_upload(ns, &order.upload_id, order.dataset_receipt.as_deref())
            .await?;
        Ok(spec)
    }

    /// Finds the job an Idempotency-Key created in a namespace.
    pub async fn job_by_idempotency_key(
        &self,
        ns: &str,
        key_hash: &str,
    ) -> Result<Option<LoRATrainingJob>, AppError> {
        let list = self
            .jobs(ns)
            .list(&ListParams::default().labels(&format!("{LABEL_IDEMPOTENCY}={key_hash}")))
            .await
            .map_err(kube_err("list jobs"))?;
        Ok(list.items.into_iter().next())
    }

    /// Refunds a paid order that cannot become a job. Without a payment intent (nothing was
    /// charged) there is nothing to give back.
    async fn refund(
        &self,
        payment_intent: Option<&str>,
        ids: &OrderIds,
        reason: RefundReason,
    ) -> Result<Outcome, AppError> {
        let Some(pi) = payment_intent else {
            return Ok(Outcome::Rejected);
        };
        let state = self.stripe.refund(pi, &ids.order_hash, reason).await?;
        tracing::info!(reason = reason.as_str(), state = ?state, "paid order refunded");
        Ok(Outcome::Refunded)
    }

    /// Creates (or finds again) the draft of an order: everything checked as for a job, the
    /// plan's price quoted, stored in the upload's region. The same Idempotency-Key gives the
    /// same draft; with another order it is refused.
    pub async fn create_draft(
        &self,
        ns: &str,
        order: &Order,
        idempotency_key: &str,
    ) -> Result<(DraftId, Draft), AppError> {
        let plan = self
            .config
            .plans
            .get(&order.plan)
            .ok_or_else(|| OrderError::UnknownPlan(order.plan.clone()))?;
        let price = plan
            .price
            .clone()
            .ok_or_else(|| OrderError::Unpriced(order.plan.clone()))?;
        let upload = UploadId::parse(&order.upload_id)
            .ok_or_else(|| AppError::BadUploadId(order.upload_id.clone()))?;
        // Everything a job would be refused for is refused now, before the customer pays.
        self.job_spec(ns, order).await?;
        let id = DraftId(UploadId {
            region: upload.region.clone(),
            token: self.hash(&format!("draft:{ns}"), idempotency_key),
        });
        let bucket = self
            .dataset_bucket(id.region())
            .ok_or_else(|| AppError::BadUploadId(order.upload_id.clone()))?;
        let key = id.key(ns);
        if let Some(bytes) = self.storage.get_record(&bucket, &key).await? {
            let stored: Draft =
                serde_json::from_slice(&bytes).map_err(|_| AppError::IdempotencyMismatch)?;
            if &stored.order != order {
                return Err(AppError::IdempotencyMismatch);
            }
            return Ok((id, stored));
        }
        let draft = Draft {
            order: order.clone(),
            price,
            created_at: Timestamp::now().as_second(),
        };
        let bytes = serde_json::to_vec(&draft).map_err(|_| AppError::IdempotencyMismatch)?;
        self.storage.put_record(&bucket, &key, bytes).await?;
        Ok((id, draft))
    }

    /// The order of a paid draft, provided the checkout charged exactly the quoted price.
    async fn paid_draft(
        &self,
        ns: &str,
        id: &str,
        amount_total: Option<i64>,
        currency: Option<&str>,
    ) -> Result<Result<Order, PaidDraft>, AppError> {
        let Some(id) = DraftId::parse(id) else {
            return Ok(Err(PaidDraft::Gone));
        };
        let Some(bucket) = self.dataset_bucket(id.region()) else {
            return Ok(Err(PaidDraft::Gone));
        };
        let Some(bytes) = self.storage.get_record(&bucket, &id.key(ns)).await? else {
            return Ok(Err(PaidDraft::Gone));
        };
        let Ok(draft) = serde_json::from_slice::<Draft>(&bytes) else {
            return Ok(Err(PaidDraft::Gone));
        };
        let paid = amount_total == Some(draft.price.amount)
            && currency.is_some_and(|c| c.eq_ignore_ascii_case(&draft.price.currency));
        Ok(if paid {
            Ok(draft.order)
        } else {
            Err(PaidDraft::WrongPrice)
        })
    }

    /// Deletes a draft order (gone already is fine).
    async fn delete_draft(&self, ns: &str, id: &str) -> Result<(), AppError> {
        let Some(id) = DraftId::parse(id) else {
            return Ok(());
        };
        if let Some(bucket) = self.dataset_bucket(id.region()) {
            self.storage.delete_record(&bucket, &id.key(ns)).await?;
        }
        Ok(())
    }

    /// Handles one verified webhook event.
    pub async fn handle_event(&self, event: WebhookEvent) -> Result<Outcome, AppError> {
        let ns = self.config.stripe_namespace.clone();
        match event {
            WebhookEvent::Paid {
                session_id,
                payment_intent,
                metadata,
                amount_total,
                currency,
            } => {
                let ids = OrderIds {
                    source: "stripe",
                    order_hash: self.hash("session", &session_id),
                    payment_hash: payment_intent.as_deref().map(|p| self.hash("payment", p)),
                    idempotency: None,
                };
                let pi = payment_intent.as_deref();
                // The checkout names a draft order, which holds everything the customer chose:
                // their words never travel through Stripe.
                let Some(id) = metadata.get("order_id") else {
                    return self.refund(pi, &ids, RefundReason::OrderRejected).await;
                };
                let order = match self
                    .paid_draft(&ns, id, amount_total, currency.as_deref())
                    .await?
                {
                    Ok(order) => order,
                    Err(PaidDraft::Gone) => {
                        // A redelivery finds its draft gone (deleted when the job was made, or
                        // expired) and still has its job.
                        let name = order::job_name(&ids.order_hash);
                        let api = self.jobs(&ns);
                        if api
                            .get_opt(&name)
                            .await
                            .map_err(kube_err("get job"))?
                            .is_some()
                        {
                            return Ok(Outcome::Duplicate);
                        }
                        // Its job was erased, or its payment refunded or disputed: replayed, it
                        // is neither a job again nor a second refund.
                        if self.revoked(&ns, &ids).await?.is_some() {
                            return Ok(Outcome::RevokedFirst);
                        }
                        return self.refund(pi, &ids, RefundReason::OrderRejected).await;
                    }
                    // The draft stays: the storefront may still check it out at its price.
                    Err(PaidDraft::WrongPrice) => {
                        return self.refund(pi, &ids, RefundReason::PriceMismatch).await;
                    }
                };
                let (job, created) = match self.create_job(&ns, &order, &ids).await {
                    Ok(r) => r,
                    Err(AppError::Revoked(_)) => {
                        // The refund came first; the upload is the order's only data, unless
                        // another order consumed it.
                        self.delete_unclaimed_upload(&ns, &order.upload_id, &ids.order_hash)
                            .await?;
                        return Ok(Outcome::RevokedFirst);
                    }
                    // Paid for, and it can never become a job: the money goes back before the
                    // event is acknowledged.
                    Err(
                        AppError::Order(_)
                        | AppError::Upload(_)
                        | AppError::UploadNotFound(_)
                        | AppError::UploadConsumed(_)
                        | AppError::BadUploadId(_),
                    ) => return self.refund(pi, &ids, RefundReason::OrderRejected).await,
                    Err(e) => return Err(e),
                };
                // What a refund of the job would need, kept before the event is acknowledged
                // (a redelivery records it again, harmlessly).
                ledger::record_payment(&self.kube, &job, id, pi, &ids.order_hash, created).await?;
                // The job holds the order now: the draft's copy of the customer's words goes at
                // once rather than with its TTL (a redelivery then finds the job).
                self.delete_draft(&ns, id).await?;
                // Write-then-read: a refund that raced past our tombstone check is seen here.
                if created && self.revoked(&ns, &ids).await?.is_some() {
                    self.erase(&ns, &job.name_any(), ErasureReason::Refund)
                        .await?;
                    return Ok(Outcome::RevokedFirst);
                }
                Ok(if created {
                    Outcome::Created
                } else {
                    Outcome::Duplicate
                })
            }
            WebhookEvent::Revoked {
                reason,
                payment_intent,
            } => {
                let hash = self.hash("payment", &payment_intent);
                self.write_tombstone(
                    &ns,
                    &revoked_name(&hash),
                    &hash,
                    BTreeMap::from([
                        ("reason".to_string(), reason.as_str().to_string()),
                        ("recordedAt".to_string(), Timestamp::now().to_string()),
                    ]),
                )
                .await?;
                let jobs = self
                    .jobs(&ns)
                    .list(&ListParams::default().labels(&format!("{LABEL_PAYMENT}={hash}")))
                    .await
                    .map_err(kube_err("list jobs"))?;
                if jobs.items.is_empty() {
                    return Ok(Outcome::Tombstoned);
                }
                for job in jobs.items {
                    self.erase(&ns, &job.name_any(), erasure_reason(reason))
                        .await?;
                }
                Ok(Outcome::Erased)
            }
            WebhookEvent::AwaitingPayment | WebhookEvent::PartialRefund | WebhookEvent::Ignored => {
                Ok(Outcome::Ignored)
            }
        }
    }

    /// Deletes an upload that no other order holds a claim on.
    async fn delete_unclaimed_upload(
        &self,
        ns: &str,
        upload_id: &str,
        order_hash: &str,
    ) -> Result<(), AppError> {
        let Some(upload) = UploadId::parse(upload_id) else {
            return Ok(());
        };
        let Some(region) = self.platform.region(&upload.region) else {
            return Ok(());
        };
        let key = upload.key(ns);
        let claim = upload_claim_name(&s3_uri(&region.buckets.datasets, &key));
        if self
            .claim_holder(ns, &claim)
            .await?
            .is_some_and(|h| h != order_hash)
        {
            return Ok(());
        }
        self.storage
            .delete_object(&region.buckets.datasets, &key)
            .await?;
        Ok(())
    }

    /// Whether a job of this order can owe something once it exists: a refund (it was paid
    /// for) or notifications (its tenant has an endpoint).
    fn owes_after_job(&self, ns: &str, ids: &OrderIds) -> bool {
        ids.payment_hash.is_some()
            || self
                .config
                .tenants
                .iter()
                .any(|t| t.namespace == ns && t.notifications.is_some())
    }
}
