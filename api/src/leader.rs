//! Leadership of the retention loop: one replica deletes, the others stand by. The election
//! itself is the shared Lease election of `loraplane-crds` (the operator uses the same one);
//! this wrapper keeps the answer of the last round where the retention loop can read it
//! without awaiting.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use loraplane_crds::leader::Election;

/// A replica's view of the lease.
pub struct Leader {
    client: kube::Client,
    election: Election,
    leading: AtomicBool,
}

impl std::fmt::Debug for Leader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leader")
            .field("election", &self.election)
            .field("leading", &self.is_leader())
            .finish_non_exhaustive()
    }
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
            client,
            election: Election {
                namespace: namespace.into(),
                name: name.into(),
                identity: identity.into(),
                lease_duration: duration,
            },
            leading: AtomicBool::new(false),
        }
    }

    /// Whether this replica held the lease at its last renewal.
    pub fn is_leader(&self) -> bool {
        self.leading.load(Ordering::Relaxed)
    }

    /// How often to try to acquire or renew.
    pub fn retry_period(&self) -> Duration {
        (self.election.lease_duration / 3).max(Duration::from_millis(100))
    }

    /// One acquisition or renewal attempt; returns whether this replica leads. A failed round
    /// counts as not leading: deleting customer data on a stale belief of leadership is worse
    /// than a late deletion.
    pub async fn try_acquire(&self) -> bool {
        let leading = match self.election.try_acquire(&self.client).await {
            Ok(leading) => leading,
            Err(e) => {
                tracing::warn!(error = %e, "retention leader election round failed");
                false
            }
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
                tracing::info!(leading = now, lease = %self.election.name, "retention leadership changed");
            }
            tokio::time::sleep(self.retry_period()).await;
        }
    }
}
