//! A customer's journey as reusable steps, shared by the tests and `loraplane-demo`: place a
//! paid order (upload + signed Stripe event), watch the job's placement and progress, preempt
//! its spot node, download and check the LoRA, wait out retention, and look at what is left
//! the way an auditor would. Every step records a line on a [`Timeline`] (printed live by the
//! demo) and fails with a message saying what was expected and what was seen.

use std::time::{Duration, Instant};

use loraplane_crds::LoRATrainingJob;
use loraplane_crds::v1alpha1::Phase;
use serde_json::{Value, json};

use crate::config::{ORDERS_NS, REGIONS, SYSTEM_NS};
use crate::endpoints::{Draft, Endpoints};
use crate::fixtures::{self, LoraFacts};
use crate::http;
use crate::stack::{Stack, StackError, job_name_for_session};

/// Why a journey step failed.
#[derive(Debug, thiserror::Error)]
pub enum JourneyError {
    /// The stack failed underneath.
    #[error(transparent)]
    Stack(#[from] StackError),
    /// A fixture failed (dataset, LoRA check).
    #[error(transparent)]
    Fixture(#[from] fixtures::FixtureError),
    /// A step saw something other than what the product promises.
    #[error("{step}: {message}")]
    Check {
        /// The step.
        step: &'static str,
        /// What was expected and seen.
        message: String,
    },
}

fn check(
    step: &'static str,
    ok: bool,
    message: impl FnOnce() -> String,
) -> Result<(), JourneyError> {
    if ok {
        Ok(())
    } else {
        Err(JourneyError::Check {
            step,
            message: message(),
        })
    }
}

/// One line of the timeline.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Time since the timeline started.
    pub elapsed: Duration,
    /// Wall-clock time (UTC, RFC 3339).
    pub wall: String,
    /// What happened (short).
    pub what: String,
    /// Details: where it ran, progress, sizes.
    pub detail: String,
}

/// The journey's timeline.
#[derive(Debug)]
pub struct Timeline {
    start: Instant,
    live: bool,
    /// Entries so far.
    pub entries: Vec<Entry>,
}

impl Timeline {
    /// A timeline; `live` prints every entry as it is recorded.
    pub fn new(live: bool) -> Timeline {
        Timeline {
            start: Instant::now(),
            live,
            entries: Vec::new(),
        }
    }

    /// Records an entry.
    pub fn note(&mut self, what: &str, detail: impl Into<String>) {
        let e = Entry {
            elapsed: self.start.elapsed(),
            wall: k8s_openapi::jiff::Timestamp::now()
                .round(k8s_openapi::jiff::Unit::Second)
                .map(|t| t.to_string())
                .unwrap_or_default(),
            what: what.to_string(),
            detail: detail.into(),
        };
        if self.live {
            println!("{}", format_entry(&e));
        }
        self.entries.push(e);
    }

    /// Prints free text (a block such as kubectl output) when live.
    pub fn block(&self, text: &str) {
        if self.live {
            for line in text.lines() {
                println!("             │ {line}");
            }
        }
    }
}

/// `+  12.3s  10:45:01Z  what               detail`
pub fn format_entry(e: &Entry) -> String {
    let clock = e.wall.get(11..).unwrap_or(&e.wall);
    format!(
        "+{:>6.1}s  {clock:<9}  {:<22} {}",
        e.elapsed.as_secs_f64(),
        e.what,
        e.detail
    )
}

/// What a customer orders.
#[derive(Debug, Clone)]
pub struct OrderSpec {
    /// Stripe checkout session id.
    pub session: String,
    /// Stripe payment intent id.
    pub payment_intent: String,
    /// Plan (`standard` or `zero`).
    pub plan: String,
    /// `sdxl` or `sd15`.
    pub family: String,
    /// `eea`, `us` or `any`.
    pub residency: String,
    /// Training steps.
    pub steps: u32,
}

impl OrderSpec {
    /// An order with ids derived from `tag`.
    pub fn new(tag: &str, plan: &str, family: &str, residency: &str, steps: u32) -> OrderSpec {
        OrderSpec {
            session: format!("cs_test_{tag}"),
            payment_intent: format!("pi_test_{tag}"),
            plan: plan.into(),
            family: family.into(),
            residency: residency.into(),
            steps,
        }
    }
}

/// The customer's trigger word in every scenario.
pub const TRIGGER_WORD: &str = "zxqcat";
/// The customer's concept description in every scenario.
pub const DESCRIPTION: &str = "my grey cat Mimi, private description";

/// The order the storefront records as a draft before checkout: everything the customer chose,
/// their words included, which never go to Stripe.
pub fn draft_order(o: &OrderSpec, upload_id: &str, receipt: &str) -> Value {
    json!({
        "family": o.family,
        "conceptType": "character",
        "triggerWord": TRIGGER_WORD,
        "description": DESCRIPTION,
        "plan": o.plan,
        "residency": o.residency,
        "uploadId": upload_id,
        "steps": o.steps,
        "datasetReceipt": receipt,
    })
}

/// A signed-and-paid `checkout.session.completed` of a draft order: the session's metadata
/// holds only the draft's id, and it charged what the draft quoted.
pub fn paid_draft_event(o: &OrderSpec, draft: &Draft) -> Value {
    json!({
        "id": format!("evt_{}", o.session),
        "type": "checkout.session.completed",
        "data": {"object": {
            "id": o.session,
            "object": "checkout.session",
            "payment_status": "paid",
            "payment_intent": o.payment_intent,
            "amount_total": draft.amount,
            "currency": draft.currency,
            "customer_details": {"email": "customer@example.com"},
            "metadata": {"order_id": draft.order_id}
        }}
    })
}

/// A full `charge.refunded` event for a payment.
pub fn refund_event(payment_intent: &str) -> Value {
    json!({
        "id": format!("evt_refund_{payment_intent}"),
        "type": "charge.refunded",
        "data": {"object": {"id": "ch_e2e", "object": "charge", "refunded": true, "payment_intent": payment_intent}}
    })
}

/// A job created from an order.
#[derive(Debug, Clone)]
pub struct Placed {
    /// Job name.
    pub job: String,
    /// Job uid.
    pub uid: String,
    /// The upload id.
    pub upload_id: String,
    /// The dataset's object key in its bucket.
    pub dataset_key: String,
    /// The dataset's region.
    pub dataset_region: String,
}

/// Uploads a generated dataset and delivers the paid checkout event; returns the created job.
pub async fn place_order(
    stack: &Endpoints,
    order: &OrderSpec,
    tl: &mut Timeline,
) -> Result<Placed, JourneyError> {
    let zip = fixtures::dataset_zip(6)?;
    let size = zip.len();
    let upload_id = stack.upload_dataset(&order.residency, zip).await?;
    let region = upload_id.split('.').next().unwrap_or_default().to_string();
    tl.note(
        "dataset uploaded",
        format!("6 images, {size} bytes, presigned PUT to region {region}"),
    );
    // The storefront checks the dataset before checkout and carries the receipt into the
    // draft, so neither the draft nor the webhook need look at S3 again (the trainer still
    // verifies the hash).
    let receipt = stack.validate_upload(&upload_id).await?;
    tl.note(
        "dataset validated",
        "POST /v1/uploads/{id}/validate → receipt carried in the draft order",
    );
    let draft = stack
        .draft_order(&draft_order(order, &upload_id, &receipt), &order.session)
        .await?;
    tl.note(
        "draft order recorded",
        format!(
            "POST /v1/orders → {} {} to charge; the customer's words stay in region {region}",
            draft.amount, draft.currency
        ),
    );
    let paid = paid_draft_event(order, &draft);
    let stripe_bound = paid["data"]["object"].to_string();
    check(
        "checkout metadata",
        !stripe_bound.contains(TRIGGER_WORD) && !stripe_bound.contains(DESCRIPTION),
        || format!("the checkout session carries customer text: {stripe_bound}"),
    )?;
    let outcome = stack.webhook(&paid).await?;
    check("checkout webhook", outcome == "created", || {
        format!("expected outcome created, got {outcome:?}")
    })?;
    let job = job_name_for_session(&order.session);
    let created = stack.job(&job).await?.ok_or_else(|| JourneyError::Check {
        step: "checkout webhook",
        message: format!("job {job} does not exist after a created outcome"),
    })?;
    let dataset_key = created
        .spec
        .dataset
        .uri
        .strip_prefix("s3://")
        .and_then(|r| r.split_once('/'))
        .map(|(_, k)| k.to_string())
        .unwrap_or_default();
    tl.note(
        "order paid",
        format!(
            "signed checkout.session.completed → job {job} ({} {}, residency {}, {} steps)",
            order.family, order.plan, order.residency, order.steps
        ),
    );
    Ok(Placed {
        job,
        uid: created.metadata.uid.clone().unwrap_or_default(),
        upload_id,
        dataset_key,
        dataset_region: region,
    })
}

/// The jurisdiction of a region of the stack.
pub fn jurisdiction(region: &str) -> &'static str {
    REGIONS
        .iter()
        .find(|(r, _)| *r == region)
        .map(|(_, j)| *j)
        .unwrap_or("unknown")
}

/// Phase of a job.
pub fn phase(job: &LoRATrainingJob) -> Option<Phase> {
    job.status.as_ref().and_then(|s| s.phase)
}

/// (region, pool, node) of the job's current placement.
pub fn placement(job: &LoRATrainingJob) -> Option<(String, String, String)> {
    let p = job.status.as_ref()?.placement.as_ref()?;
    Some((
        p.region.clone(),
        p.pool.clone(),
        p.node.clone().unwrap_or_default(),
    ))
}

/// (step, total, last checkpoint step) of the job.
pub fn progress(job: &LoRATrainingJob) -> (i64, i64, i64) {
    job.status
        .as_ref()
        .and_then(|s| s.progress.as_ref())
        .map(|p| (p.step, p.total_steps, p.last_checkpoint_step.unwrap_or(0)))
        .unwrap_or((0, 0, 0))
}

/// One attempt as an auditor reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptView {
    /// Region.
    pub region: String,
    /// Pool.
    pub pool: String,
    /// Node.
    pub node: String,
    /// Why it ended.
    pub reason: Option<String>,
    /// Checkpoint step it resumed from.
    pub resumed_from_step: Option<i64>,
}

/// The job's attempts.
pub fn attempts(job: &LoRATrainingJob) -> Vec<AttemptView> {
    job.status
        .as_ref()
        .map(|s| {
            s.attempts
                .iter()
                .map(|a| AttemptView {
                    region: a.region.clone(),
                    pool: a.pool.clone(),
                    node: a.node.clone().unwrap_or_default(),
                    reason: a.reason.clone(),
                    resumed_from_step: a.resumed_from_step,
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until the job runs with a placement; returns it.
pub async fn wait_running(
    stack: &Endpoints,
    job: &str,
    timeout: Duration,
    tl: &mut Timeline,
) -> Result<LoRATrainingJob, JourneyError> {
    let j = stack
        .wait_job(job, timeout, "phase Running with a placement", |j| {
            phase(j) == Some(Phase::Running) && placement(j).is_some()
        })
        .await?;
    let (region, pool, node) = placement(&j).unwrap_or_default();
    tl.note(
        "training started",
        format!(
            "region {region} ({}), pool {pool}, node {node}",
            jurisdiction(&region)
        ),
    );
    Ok(j)
}

/// Where a running job stands once its current attempt has uploaded a checkpoint.
#[derive(Debug, Clone)]
pub struct Checkpointed {
    /// Region of the attempt.
    pub region: String,
    /// Pool of the attempt.
    pub pool: String,
    /// Node of the attempt.
    pub node: String,
    /// The checkpoint's step.
    pub step: i64,
}

/// Waits until the running job has a checkpoint and steps still to go.
pub async fn wait_checkpoint(
    stack: &Endpoints,
    job: &str,
    tl: &mut Timeline,
) -> Result<Checkpointed, JourneyError> {
    let j = stack
        .wait_job(
            job,
            Duration::from_secs(120),
            "a checkpoint while running",
            |j| {
                let (step, total, ckpt) = progress(j);
                phase(j) == Some(Phase::Running) && ckpt > 0 && step < total
            },
        )
        .await?;
    let (step, total, ckpt) = progress(&j);
    tl.note(
        "progress",
        format!("step {step}/{total}, checkpoint at step {ckpt} uploaded"),
    );
    let (region, pool, node) = placement(&j).unwrap_or_default();
    Ok(Checkpointed {
        region,
        pool,
        node,
        step: ckpt,
    })
}

/// Waits for a checkpoint of the current attempt, then preempts the job's spot node.
/// Returns (region, node, checkpoint step) of the preempted attempt.
pub async fn preempt_after_checkpoint(
    stack: &Stack,
    job: &str,
    tl: &mut Timeline,
) -> Result<(String, String, i64), JourneyError> {
    let c = wait_checkpoint(stack, job, tl).await?;
    stack
        .cluster()?
        .preempt_node(&c.node, None)
        .await
        .map_err(|e| JourneyError::Check {
            step: "preempt",
            message: e.to_string(),
        })?;
    tl.note(
        "spot preemption",
        format!(
            "node {} (pool {}, {}) reclaimed by the cloud",
            c.node, c.pool, c.region
        ),
    );
    Ok((c.region, c.node, c.step))
}

/// Waits until the job runs again in an attempt after `after_attempts`; returns the job.
pub async fn wait_resumed(
    stack: &Endpoints,
    job: &str,
    after_attempts: usize,
    tl: &mut Timeline,
) -> Result<LoRATrainingJob, JourneyError> {
    let j = stack
        .wait_job(job, Duration::from_secs(90), "a new attempt running", |j| {
            phase(j) == Some(Phase::Running) && attempts(j).len() > after_attempts
        })
        .await?;
    let (region, pool, node) = placement(&j).unwrap_or_default();
    let resumed = attempts(&j)
        .last()
        .and_then(|a| a.resumed_from_step)
        .unwrap_or(0);
    tl.note(
        "failed over",
        format!(
            "attempt {} in region {region} ({}), pool {pool}, node {node}, resumed from step {resumed}",
            attempts(&j).len(),
            jurisdiction(&region)
        ),
    );
    Ok(j)
}

/// Waits for success.
pub async fn wait_succeeded(
    stack: &Endpoints,
    job: &str,
    tl: &mut Timeline,
) -> Result<LoRATrainingJob, JourneyError> {
    let j = stack
        .wait_job(job, Duration::from_secs(240), "phase Succeeded", |j| {
            matches!(
                phase(j),
                Some(Phase::Succeeded | Phase::Failed | Phase::Cancelled)
            )
        })
        .await?;
    check("training", phase(&j) == Some(Phase::Succeeded), || {
        format!(
            "the job ended {:?}: {}",
            phase(&j),
            serde_json::to_string(&j.status).unwrap_or_default()
        )
    })?;
    if j.status.as_ref().is_none_or(|s| s.artifacts.is_empty()) {
        let mut msgs = Vec::new();
        for p in stack
            .pods_of(&j.metadata.uid.clone().unwrap_or_default())
            .await?
        {
            let t = p
                .status
                .and_then(|s| s.container_statuses)
                .and_then(|cs| cs.into_iter().next())
                .and_then(|c| c.state)
                .and_then(|s| s.terminated)
                .map(|t| format!("exit {} message {:?}", t.exit_code, t.message))
                .unwrap_or_default();
            msgs.push(t);
        }
        return Err(JourneyError::Check {
            step: "training",
            message: format!("succeeded without artifacts; trainer pods ended: {msgs:?}"),
        });
    }
    let (step, total, _) = progress(&j);
    let loss = j
        .status
        .as_ref()
        .and_then(|s| s.progress.as_ref())
        .and_then(|p| p.loss)
        .map(|l| format!(", last loss {l:.4}"))
        .unwrap_or_default();
    tl.note(
        "training succeeded",
        format!(
            "step {step}/{total}{loss}, {} artifact(s)",
            j.status.as_ref().map(|s| s.artifacts.len()).unwrap_or(0)
        ),
    );
    Ok(j)
}

/// The job's sample images as the API serves them.
#[derive(Debug, Clone)]
pub struct SampleDownload {
    /// (kind, step, prompt index) of every link, in the API's order.
    pub links: Vec<(String, i64, Option<i64>)>,
    /// The contact sheet's PNG.
    pub contact_sheet: Vec<u8>,
}

/// Asks the API for the job's sample links and fetches the contact sheet with a plain GET,
/// checking it is a PNG.
pub async fn download_samples(
    stack: &Endpoints,
    job: &str,
    tl: &mut Timeline,
) -> Result<SampleDownload, JourneyError> {
    let r = stack
        .api("GET", &format!("/v1/jobs/{job}/samples"), None)
        .await?;
    check("samples", r.status == 200, || {
        format!(
            "GET samples answered {}: {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        )
    })?;
    let body = r.json();
    let list = body["samples"].as_array().cloned().unwrap_or_default();
    let links: Vec<(String, i64, Option<i64>)> = list
        .iter()
        .map(|l| {
            (
                l["kind"].as_str().unwrap_or_default().to_string(),
                l["step"].as_i64().unwrap_or(-1),
                l["prompt"].as_i64(),
            )
        })
        .collect();
    let sheet = list
        .iter()
        .find(|l| l["kind"] == "contactSheet")
        .and_then(|l| l["url"].as_str())
        .unwrap_or_default();
    check("samples", !sheet.is_empty(), || {
        "no contact sheet link".into()
    })?;
    let got = http::request("GET", sheet, &[], Vec::new())
        .await
        .map_err(StackError::from)?;
    check(
        "samples",
        got.status == 200 && got.body.starts_with(b"\x89PNG"),
        || format!("the contact sheet answered {} (not a PNG)", got.status),
    )?;
    let images = links.iter().filter(|l| l.0 == "image").count();
    let steps: std::collections::BTreeSet<i64> = links.iter().map(|l| l.1).collect();
    tl.note(
        "samples",
        format!(
            "{images} images at steps {steps:?}; contact sheet {} bytes",
            got.body.len()
        ),
    );
    Ok(SampleDownload {
        links,
        contact_sheet: got.body,
    })
}

/// One downloaded LoRA file.
#[derive(Debug, Clone)]
pub struct Download {
    /// `kohya` or `diffusers`.
    pub format: String,
    /// Bytes downloaded.
    pub bytes: usize,
    /// The SHA-256 the API announced (checked).
    pub sha256: String,
    /// What the file says about itself.
    pub facts: LoraFacts,
}

/// Asks the API for the job's download links and fetches each with a plain HTTP GET,
/// checking SHA-256 and that it parses as a LoRA safetensors file.
pub async fn download_loras(
    stack: &Endpoints,
    job: &str,
    tl: &mut Timeline,
) -> Result<Vec<Download>, JourneyError> {
    let r = stack
        .api("GET", &format!("/v1/jobs/{job}/artifacts"), None)
        .await?;
    check("artifacts", r.status == 200, || {
        format!(
            "GET artifacts answered {}: {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        )
    })?;
    let body = r.json();
    let links = body["artifacts"].as_array().cloned().unwrap_or_default();
    check("artifacts", !links.is_empty(), || {
        "no download links".into()
    })?;
    let mut out = Vec::new();
    for l in links {
        let url = l["url"].as_str().unwrap_or_default();
        let sha = l["sha256"].as_str().unwrap_or_default().to_string();
        let format = l["format"].as_str().unwrap_or_default().to_string();
        let got = http::request("GET", url, &[], Vec::new())
            .await
            .map_err(StackError::from)?;
        check("download", got.status == 200, || {
            format!("GET {} answered {}", http::strip_query(url), got.status)
        })?;
        let facts = fixtures::check_lora(&got.body, &sha)?;
        tl.note(
            "LoRA downloaded",
            format!(
                "{format}: {} bytes, sha256 {}… verified, {} tensors{}",
                got.body.len(),
                &sha[..sha.len().min(12)],
                facts.tensors,
                facts
                    .base_model_version
                    .as_deref()
                    .map(|v| format!(", base {v}"))
                    .unwrap_or_default()
            ),
        );
        out.push(Download {
            format,
            bytes: got.body.len(),
            sha256: sha,
            facts,
        });
    }
    Ok(out)
}

/// What exists of a job, as an auditor would list it.
#[derive(Debug, Clone, Default)]
pub struct Leftovers {
    /// The job object still exists.
    pub job_exists: bool,
    /// Its trainer-config Secret still exists.
    pub secret_exists: bool,
    /// Its pods (name, phase) still present.
    pub pods: Vec<(String, String)>,
    /// Pods still running or pending.
    pub live_pods: usize,
    /// Its claims.
    pub claims: Vec<String>,
    /// Its S3 objects (`bucket/key`).
    pub objects: Vec<String>,
    /// Events about it: (reason, message).
    pub events: Vec<(String, String)>,
    /// The operator's audit records of this job (by the hash of its uid), as data maps.
    pub audit_records: Vec<serde_json::Map<String, Value>>,
}

/// Lists what exists of a job.
pub async fn leftovers(stack: &Endpoints, p: &Placed) -> Result<Leftovers, JourneyError> {
    let pods = stack.pods_of(&p.uid).await?;
    let live_pods = pods
        .iter()
        .filter(|x| {
            let ph = x
                .status
                .as_ref()
                .and_then(|s| s.phase.clone())
                .unwrap_or_default();
            ph != "Succeeded" && ph != "Failed"
        })
        .count();
    let uid_hash = loraplane_operator::audit::uid_hash(&p.uid);
    let cms =
        kube::Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(stack.client(), SYSTEM_NS)
            .list(&kube::api::ListParams::default().labels(&format!(
                "{}={}",
                loraplane_crds::layout::LABEL_RECORD,
                loraplane_crds::layout::AUDIT_RECORD
            )))
            .await
            .map_err(|source| StackError::Kube {
                action: "list audit records",
                source,
            })?;
    let audit_records = cms
        .items
        .into_iter()
        .filter_map(|c| c.data)
        .filter(|d| d.get("jobUidSha256") == Some(&uid_hash))
        .map(|d| d.into_iter().map(|(k, v)| (k, Value::from(v))).collect())
        .collect();
    let secret_exists =
        kube::Api::<k8s_openapi::api::core::v1::Secret>::namespaced(stack.client(), ORDERS_NS)
            .get_opt(&loraplane_operator::resources::secret_name(&p.job))
            .await
            .map_err(|source| StackError::Kube {
                action: "get the trainer-config Secret",
                source,
            })?
            .is_some();
    Ok(Leftovers {
        job_exists: stack.job(&p.job).await?.is_some(),
        secret_exists,
        pods: pods
            .iter()
            .map(|x| {
                (
                    x.metadata.name.clone().unwrap_or_default(),
                    x.status
                        .as_ref()
                        .and_then(|s| s.phase.clone())
                        .unwrap_or_default(),
                )
            })
            .collect(),
        live_pods,
        claims: stack
            .claims_of(&p.uid)
            .await?
            .into_iter()
            .filter_map(|c| c.metadata.name)
            .collect(),
        objects: stack
            .job_objects(&p.job, &p.uid, Some(&p.dataset_key))
            .await?,
        events: stack.events_of(&p.job).await?,
        audit_records,
    })
}

/// Waits until retention has run its course: inputs deleted first, then, when the outputs fall
/// due, the job object with everything left of it. Returns the last state seen of the job
/// (its retention times) and the audit record left in its place.
pub async fn wait_retention(
    stack: &Endpoints,
    p: &Placed,
    tl: &mut Timeline,
) -> Result<serde_json::Map<String, Value>, JourneyError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let mut last: Option<LoRATrainingJob> = None;
    loop {
        match stack.job(&p.job).await? {
            Some(j) => last = Some(j),
            None => {
                let left = leftovers(stack, p).await?;
                if let Some(record) = left.audit_records.into_iter().next() {
                    let r = last
                        .as_ref()
                        .and_then(|j| j.status.as_ref())
                        .and_then(|s| s.retention.clone())
                        .unwrap_or_default();
                    let t = |x: &Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>| {
                        x.as_ref().map(|t| t.0.to_string()).unwrap_or_default()
                    };
                    let field = |k: &str| {
                        record
                            .get(k)
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string()
                    };
                    tl.note(
                        "retention ran",
                        format!(
                            "inputs deleted {} (due {}); job and outputs deleted {} (due {}), reason {}",
                            t(&r.inputs_deleted_at),
                            t(&r.inputs_expire_at),
                            field("deletedAt"),
                            t(&r.outputs_expire_at),
                            field("reason"),
                        ),
                    );
                    return Ok(record);
                }
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(JourneyError::Check {
                step: "retention",
                message: format!(
                    "retention did not delete the job within 90 s; last status: {:?}",
                    last.and_then(|j| j.status)
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `kubectl get ltj -n orders` against the stack (the real kubectl binary).
pub async fn kubectl_get_ltj(stack: &Endpoints, wide: bool) -> Result<String, JourneyError> {
    let mut args = vec![
        "--kubeconfig".to_string(),
        stack.kubeconfig().display().to_string(),
        "get".into(),
        "ltj".into(),
        "-n".into(),
        ORDERS_NS.into(),
    ];
    if wide {
        args.push("-o".into());
        args.push("wide".into());
    }
    let out = tokio::process::Command::new("kubectl")
        .args(&args)
        .output()
        .await
        .map_err(|e| JourneyError::Check {
            step: "kubectl",
            message: format!(
                "cannot run kubectl ({e}): install it (Debian: apt-get install kubernetes-client)"
            ),
        })?;
    check("kubectl", out.status.success(), || {
        format!(
            "kubectl get ltj failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What the happy journey observed, for the test to assert on.
#[derive(Debug, Clone)]
pub struct JourneyReport {
    /// The job.
    pub placed: Placed,
    /// Attempts at the end.
    pub attempts: Vec<AttemptView>,
    /// The preempted attempt's region and node.
    pub preempted: (String, String),
    /// Checkpoint step seen before the preemption.
    pub checkpoint_before_preemption: i64,
    /// `kubectl get ltj` while training.
    pub kubectl_running: String,
    /// Downloads.
    pub downloads: Vec<Download>,
    /// The sample images and their contact sheet.
    pub samples: SampleDownload,
    /// The API's answer for the samples after retention (404: the job is gone).
    pub samples_status_after_retention: u16,
    /// Objects of the job right after success (before retention).
    pub objects_after_success: Vec<String>,
    /// Claims right after success.
    pub claims_after_success: Vec<String>,
    /// What is left after retention.
    pub after_retention: Leftovers,
    /// The audit record retention left in the job's place.
    pub audit_record: serde_json::Map<String, Value>,
    /// The API's answer for the artifacts after retention (404: the job is gone).
    pub artifacts_status_after_retention: u16,
    /// The API's view of the job at the end.
    pub api_view: Value,
}

/// The main journey: EEA-only SDXL order, placement in the EEA, spot preemption mid-training,
/// resume in the other EEA region from the checkpoint, download and check, retention.
pub async fn happy_journey(
    stack: &Stack,
    order: &OrderSpec,
    tl: &mut Timeline,
) -> Result<JourneyReport, JourneyError> {
    let placed = place_order(stack, order, tl).await?;
    let first = wait_running(stack, &placed.job, Duration::from_secs(60), tl).await?;
    let (first_region, ..) = placement(&first).unwrap_or_default();
    check("placement", jurisdiction(&first_region) == "eea", || {
        format!("an eea job was placed in {first_region}")
    })?;
    let (pre_region, pre_node, ckpt) = preempt_after_checkpoint(stack, &placed.job, tl).await?;
    let kubectl_running = kubectl_get_ltj(stack, true).await?;
    tl.note("kubectl get ltj -o wide", "");
    tl.block(&kubectl_running);
    let resumed = wait_resumed(stack, &placed.job, 1, tl).await?;
    // Attempts that never got a node (the preempted pool retried while empty) do not count.
    let (new_region, ..) = placement(&resumed).unwrap_or_default();
    check("failover", jurisdiction(&new_region) == "eea", || {
        format!("after preemption the eea job moved to {new_region}")
    })?;
    let done = wait_succeeded(stack, &placed.job, tl).await?;
    let claims_after_success = stack
        .claims_of(&placed.uid)
        .await?
        .into_iter()
        .filter_map(|c| c.metadata.name)
        .collect();
    let objects_after_success = stack
        .job_objects(&placed.job, &placed.uid, Some(&placed.dataset_key))
        .await?;
    let downloads = download_loras(stack, &placed.job, tl).await?;
    let samples = download_samples(stack, &placed.job, tl).await?;
    let view = stack
        .api("GET", &format!("/v1/jobs/{}", placed.job), None)
        .await?;
    let api_view = view.json();
    let audit_record = wait_retention(stack, &placed, tl).await?;
    let after = leftovers(stack, &placed).await?;
    tl.note(
        "audit",
        format!(
            "job object {}, Secret {}, {} pods, {} claims, {} S3 objects left; audit record {}; events: {}",
            if after.job_exists { "left" } else { "gone" },
            if after.secret_exists { "left" } else { "gone" },
            after.pods.len(),
            after.claims.len(),
            after.objects.len(),
            serde_json::to_string(&audit_record).unwrap_or_default(),
            after
                .events
                .iter()
                .map(|(r, _)| r.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    let gone = stack
        .api("GET", &format!("/v1/jobs/{}/artifacts", placed.job), None)
        .await?;
    let samples_gone = stack
        .api("GET", &format!("/v1/jobs/{}/samples", placed.job), None)
        .await?;
    Ok(JourneyReport {
        attempts: attempts(&done),
        placed,
        preempted: (pre_region, pre_node),
        checkpoint_before_preemption: ckpt,
        kubectl_running,
        downloads,
        samples,
        samples_status_after_retention: samples_gone.status,
        objects_after_success,
        claims_after_success,
        after_retention: after,
        audit_record,
        artifacts_status_after_retention: gone.status,
        api_view,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeline_lines_show_offset_clock_step_and_detail() {
        let e = Entry {
            elapsed: Duration::from_millis(12_345),
            wall: "2026-11-22T10:45:01Z".into(),
            what: "training started".into(),
            detail: "region eu-west (eea)".into(),
        };
        let line = format_entry(&e);
        assert!(line.starts_with("+  12.3s  10:45:01Z"), "{line}");
        assert!(line.contains("training started"), "{line}");
        assert!(line.ends_with("region eu-west (eea)"), "{line}");
    }

    #[test]
    fn a_paid_checkout_carries_only_the_drafts_id_and_its_price() {
        let o = OrderSpec::new("x", "standard", "sdxl", "eea", 30);
        let draft = Draft {
            order_id: "eu-west.0123".into(),
            amount: 1900,
            currency: "eur".into(),
        };
        let ev = paid_draft_event(&o, &draft);
        assert_eq!(ev["type"], "checkout.session.completed");
        let session = &ev["data"]["object"];
        assert_eq!(session["metadata"], json!({"order_id": "eu-west.0123"}));
        assert_eq!(
            (
                session["amount_total"].as_i64(),
                session["currency"].as_str()
            ),
            (Some(1900), Some("eur"))
        );
        let order = draft_order(&o, "eu-west.0123", "v1.1.ab.cd");
        assert_eq!(order["triggerWord"], TRIGGER_WORD);
        assert_eq!(order["steps"], 30);
        assert_eq!(jurisdiction("eu-central"), "eea");
        assert_eq!(jurisdiction("us-east"), "us");
    }
}
