//! Leader election through a `coordination.k8s.io/v1` Lease: only the operator replica that
//! holds it reconciles jobs, writes status and deletes data, so two replicas are safe. The Lease is taken and renewed with optimistic concurrency (replace
//! with the read `resourceVersion`), so of two replicas racing for an expired Lease exactly one
//! wins. A leader that cannot renew within the lease duration steps down before anyone else
//! may take over (it stops at two thirds of the duration).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::{Client, Error as KubeError};
use tokio::sync::watch;

/// Why one election round failed.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    /// Reading the Lease failed.
    #[error("could not read the Lease: {0}")]
    GetLease(#[source] KubeError),
    /// Creating the Lease failed.
    #[error("could not create the Lease: {0}")]
    CreateLease(#[source] KubeError),
    /// Updating the Lease failed.
    #[error("could not update the Lease: {0}")]
    UpdateLease(#[source] KubeError),
}

/// The settings of an election.
#[derive(Debug, Clone)]
pub struct Election {
    /// The Lease's namespace.
    pub namespace: String,
    /// The Lease's name.
    pub name: String,
    /// This replica.
    pub identity: String,
    /// How long a Lease is valid without renewal.
    pub lease_duration: Duration,
}

fn is_conflict(e: &KubeError) -> bool {
    matches!(e, KubeError::Api(s) if s.code == 409)
}

/// Whether a Lease held by someone else has expired.
pub fn expired(spec: &LeaseSpec, now: Timestamp) -> bool {
    let Some(renew) = spec.renew_time.as_ref() else {
        return true;
    };
    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(15));
    now.as_second() >= renew.0.as_second() + duration
}

impl Election {
    fn api(&self, client: &Client) -> Api<Lease> {
        Api::namespaced(client.clone(), &self.namespace)
    }

    fn spec(&self, now: Timestamp, transitions: i32, acquired: Option<MicroTime>) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(
                i32::try_from(self.lease_duration.as_secs().max(1)).unwrap_or(15),
            ),
            acquire_time: Some(acquired.unwrap_or(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// One round: take or renew the Lease. `Ok(true)` when this replica holds it.
    pub async fn try_acquire(&self, client: &Client) -> Result<bool, LeaderError> {
        let api = self.api(client);
        let now = Timestamp::now();
        let Some(mut lease) = api
            .get_opt(&self.name)
            .await
            .map_err(LeaderError::GetLease)?
        else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    namespace: Some(self.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.spec(now, 0, None)),
            };
            return match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(e) if is_conflict(&e) => Ok(false),
                Err(e) => Err(LeaderError::CreateLease(e)),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let mine = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        let free = spec.holder_identity.as_deref().is_none_or(str::is_empty) || expired(&spec, now);
        if !mine && !free {
            return Ok(false);
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!mine);
        let acquired = if mine {
            spec.acquire_time.clone()
        } else {
            None
        };
        lease.spec = Some(self.spec(now, transitions, acquired));
        match api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            // Taking a free Lease and losing the race: someone else leads now.
            Err(e) if is_conflict(&e) && !mine => Ok(false),
            // A holder's renewal conflicted: a failed round, not a lost Lease. The next round
            // re-reads it and steps down if another replica really took over.
            Err(e) => Err(LeaderError::UpdateLease(e)),
        }
    }

    /// Gives the Lease up (on graceful shutdown) so a standby takes over at once.
    pub async fn release(&self, client: &Client) -> Result<(), LeaderError> {
        let api = self.api(client);
        let Some(mut lease) = api
            .get_opt(&self.name)
            .await
            .map_err(LeaderError::GetLease)?
        else {
            return Ok(());
        };
        let mut spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        lease.spec = Some(spec);
        match api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_conflict(&e) => Ok(()),
            Err(e) => Err(LeaderError::UpdateLease(e)),
        }
    }

    /// Runs the election until `shutdown` fires, publishing leadership on `leading`. Steps
    /// down when renewal has failed for two thirds of the lease duration; after a failed round
    /// it retries four times sooner, so one lost request (a 500, a 429, a conflict) does not
    /// cost leadership — as client-go's renew deadline allows several tries.
    pub async fn run(
        self,
        client: Client,
        leading: watch::Sender<bool>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let period = (self.lease_duration / 3).max(Duration::from_millis(100));
        let mut last_renewal: Option<tokio::time::Instant> = None;
        loop {
            let mut next = period;
            match self.try_acquire(&client).await {
                Ok(true) => {
                    if !*leading.borrow() {
                        tracing::info!(identity = %self.identity, lease = %self.name, "became the leader");
                    }
                    last_renewal = Some(tokio::time::Instant::now());
                    leading.send_replace(true);
                }
                Ok(false) => {
                    if *leading.borrow() {
                        tracing::warn!(identity = %self.identity, "lost the Lease to another replica");
                    }
                    last_renewal = None;
                    leading.send_replace(false);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "leader election round failed");
                    next = (period / 4).max(Duration::from_millis(25));
                    let stale =
                        last_renewal.is_none_or(|t| t.elapsed() > self.lease_duration * 2 / 3);
                    if stale && *leading.borrow() {
                        tracing::warn!("could not renew the Lease in time; stepping down");
                        leading.send_replace(false);
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(next) => {}
                _ = shutdown.changed() => break,
            }
            if *shutdown.borrow() {
                break;
            }
        }
        if *leading.borrow() {
            leading.send_replace(false);
            if let Err(e) = self.release(&client).await {
                tracing::warn!(error = %e, "could not release the Lease");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_expires_after_its_duration() {
        let t = Timestamp::from_second(1_800_000_000).unwrap();
        let spec = LeaseSpec {
            holder_identity: Some("a".into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(t)),
            ..LeaseSpec::default()
        };
        let later = |s: i64| Timestamp::from_second(1_800_000_000 + s).unwrap();
        assert!(!expired(&spec, later(14)));
        assert!(expired(&spec, later(15)));
        assert!(expired(&LeaseSpec::default(), t));
    }
}
