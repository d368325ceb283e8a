//! Bounded polling of jobs and other state: every wait ends, and a test that times out fails
//! with what it last saw (the job's status), not with a bare timeout.

use std::time::Duration;

use kube::Client;
use kube::api::Api;
use loraplane_crds::LoRATrainingJob;

/// How often the waits look again.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// What a job poll makes of the job it sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not yet: look again.
    Wait,
    /// Done: return the job.
    Done,
    /// It will never get there (e.g. it failed): stop now.
    GiveUp,
}

/// Polls job `ns/name` every `interval` until `judge` says [`Verdict::Done`]; on a timeout or
/// [`Verdict::GiveUp`] returns the last job seen (`None` if it never existed).
pub async fn poll_job(
    client: &Client,
    ns: &str,
    name: &str,
    timeout: Duration,
    interval: Duration,
    judge: impl Fn(&LoRATrainingJob) -> Verdict,
) -> Result<LoRATrainingJob, Option<LoRATrainingJob>> {
    let api = Api::<LoRATrainingJob>::namespaced(client.clone(), ns);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = None;
    loop {
        if let Ok(job) = api.get(name).await {
            match judge(&job) {
                Verdict::Done => return Ok(job),
                Verdict::GiveUp => return Err(Some(job)),
                Verdict::Wait => last = Some(job),
            }
        }
        if tokio::time::Instant::now() > deadline {
            return Err(last);
        }
        tokio::time::sleep(interval).await;
    }
}

/// Waits until `pred` holds for job `ns/name`; panics after `timeout` with `what` and the
/// job's last status.
pub async fn wait_job(
    client: &Client,
    ns: &str,
    name: &str,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&LoRATrainingJob) -> bool,
) -> LoRATrainingJob {
    let judge = |j: &LoRATrainingJob| {
        if pred(j) {
            Verdict::Done
        } else {
            Verdict::Wait
        }
    };
    match poll_job(client, ns, name, timeout, POLL_INTERVAL, judge).await {
        Ok(job) => job,
        Err(last) => panic!(
            "job {ns}/{name}: no {what} within {timeout:?}; status: {}",
            serde_json::to_string_pretty(&last.and_then(|j| j.status)).unwrap_or_default()
        ),
    }
}

/// Waits until job `ns/name` no longer exists; panics after `timeout`.
pub async fn wait_gone(client: &Client, ns: &str, name: &str, timeout: Duration) {
    let api = Api::<LoRATrainingJob>::namespaced(client.clone(), ns);
    wait_until(
        &format!("deletion of job {ns}/{name}"),
        timeout,
        async || matches!(api.get_opt(name).await, Ok(None)),
    )
    .await;
}

/// Waits until `check` holds; panics after `timeout` naming `what`.
pub async fn wait_until(what: &str, timeout: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {what} within {timeout:?}"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// The job's phase as the CRD spells it.
pub fn phase(job: &LoRATrainingJob) -> Option<&'static str> {
    job.status
        .as_ref()
        .and_then(|s| s.phase)
        .map(|p| p.as_str())
}

/// A condition's (status, reason), by type.
pub fn condition(job: &LoRATrainingJob, type_: &str) -> Option<(String, String)> {
    job.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone()))
}
