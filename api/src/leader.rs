//! Leader election for the retention loop with a `coordination.k8s.io/v1` Lease: one replica
//! deletes, the others stand by. Acquisition and renewal are optimistic updates guarded by the
//! Lease's `resourceVersion`, so two replicas can never both believe they hold it after a
//! successful write.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;

/// A replica's view of the lease.
#[derive(Debug)]
pub struct Leader {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    leading: AtomicBool,
}

impl Leader {
    /// A candidate for lease `name` in `namespace`.
    pub fn new(
        client: kube::Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> Leader {
        Leader {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            duration,
            leading: AtomicBool::new(false),
        }
    }

    /// Whether this replica held the lease at its last renewal.
    pub fn is_leader(&self) -> bool {
        self.leading.load(Ordering::Relaxed)
    }

    /// How often to try to acquire or renew.
    pub fn retry_period(&self) -> Duration {
        self.duration / 3
    }

    /// One acquisition or renewal attempt; returns whether this replica leads.
    pub async fn try_acquire(&self) -> bool {
        let now = Timestamp::now();
        let secs = i32::try_from(self.duration.as_secs()).unwrap_or(15);
        let leading = match self.api.get_opt(&self.name).await {
            Ok(None) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.identity.clone()),
                        lease_duration_seconds: Some(secs),
                        acquire_time: Some(MicroTime(now)),
                        renew_time: Some(MicroTime(now)),
                        lease_transitions: Some(0),
                        ..LeaseSpec::default()
                    }),
                };
                self.api
                    .create(&PostParams::default(), &lease)
                    .await
                    .is_ok()
            }
            Ok(Some(mut lease)) => {
                let spec = lease.spec.clone().unwrap_or_default();
                let mine = spec.holder_identity.as_deref() == Some(self.identity.as_str());
                let expired = spec.renew_time.as_ref().is_none_or(|t| {
                    let d = i64::from(spec.lease_duration_seconds.unwrap_or(secs));
                    t.0.as_second() + d < now.as_second()
                });
                if !mine && !expired {
                    false
                } else {
                    let mut new = spec.clone();
                    if !mine {
                        new.acquire_time = Some(MicroTime(now));
                        new.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                    }
                    new.holder_identity = Some(self.identity.clone());
                    new.lease_duration_seconds = Some(secs);
                    new.renew_time = Some(MicroTime(now));
                    lease.spec = Some(new);
                    // replace carries the resourceVersion we read: a concurrent writer wins
                    // and we get 409.
                    self.api
                        .replace(&self.name, &PostParams::default(), &lease)
                        .await
                        .is_ok()
                }
            }
            Err(_) => false,
        };
        self.leading.store(leading, Ordering::Relaxed);
        leading
    }

    /// Keeps acquiring/renewing forever.
    pub async fn run(&self) {
        loop {
            let was = self.is_leader();
            let now = self.try_acquire().await;
            if was != now {
                tracing::info!(leading = now, lease = %self.name, "retention leadership changed");
            }
            tokio::time::sleep(self.retry_period()).await;
        }
    }
}
