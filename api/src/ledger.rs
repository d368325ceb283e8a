//! Where a job's [`Ledger`] lives: one Secret per job, `<job>-ledger` in the job's namespace,
//! holding the ledger as JSON under [`KEY`]. A Secret, because the ledger holds the payment
//! intent a refund names; owned by the job (an ownerReference), so Kubernetes deletes it with
//! the job, which the API's finalizer keeps until the ledger owes nothing. Writes are
//! optimistic (the resourceVersion read), so two replicas never overwrite each other.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;
use kube::api::PostParams;
use kube::{Api, ResourceExt};
use loraplane_crds::LoRATrainingJob;
use loraplane_crds::layout::{LABEL_MANAGED_BY, LABEL_RECORD};

use crate::outbox::Ledger;

/// The Secret's data key.
pub const KEY: &str = "ledger.json";
/// The value of `loraplane.io/record` on ledgers.
pub const LEDGER_RECORD: &str = "order-ledger";

/// Why a ledger could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The apiserver refused or failed.
    #[error("{action} the order ledger: {source}")]
    Kube {
        /// What was being done.
        action: &'static str,
        /// The error.
        #[source]
        source: kube::Error,
    },
    /// Another replica wrote it since it was read.
    #[error("the order ledger changed since it was read")]
    Conflict,
    /// The Secret's content is not a ledger.
    #[error("reading the order ledger: {0}")]
    Decode(serde_json::Error),
}

/// A ledger as read, with the version a write must match (`None`: not stored yet).
#[derive(Debug, Clone, Default)]
pub struct Stored {
    /// The ledger.
    pub ledger: Ledger,
    /// The Secret's resourceVersion.
    pub version: Option<String>,
}

/// The Secret's name for a job.
pub fn name(job: &str) -> String {
    format!("{job}-ledger")
}

fn secrets(client: &kube::Client, ns: &str) -> Api<Secret> {
    Api::namespaced(client.clone(), ns)
}

/// Reads a job's ledger (an empty, unstored one when there is none).
pub async fn read(client: &kube::Client, ns: &str, job: &str) -> Result<Stored, LedgerError> {
    let secret = secrets(client, ns)
        .get_opt(&name(job))
        .await
        .map_err(|source| LedgerError::Kube {
            action: "read",
            source,
        })?;
    let Some(secret) = secret else {
        return Ok(Stored::default());
    };
    let ledger = match secret.data.as_ref().and_then(|d| d.get(KEY)) {
        Some(bytes) => serde_json::from_slice(&bytes.0).map_err(LedgerError::Decode)?,
        None => Ledger::default(),
    };
    Ok(Stored {
        ledger,
        version: secret.metadata.resource_version,
    })
}

/// Writes `stored.ledger` if nobody wrote since it was read, and records the new version.
pub async fn write(
    client: &kube::Client,
    job: &LoRATrainingJob,
    stored: &mut Stored,
) -> Result<(), LedgerError> {
    let ns = job.namespace().unwrap_or_default();
    let bytes = serde_json::to_vec(&stored.ledger).map_err(LedgerError::Decode)?;
    let owner = job.controller_owner_ref(&()).map(|mut o: OwnerReference| {
        // Not the controller: the operator owns the job's children; this only ties the
        // ledger's life to the job's.
        o.controller = None;
        o.block_owner_deletion = None;
        o
    });
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name(&job.name_any())),
            namespace: Some(ns.clone()),
            labels: Some(BTreeMap::from([
                (LABEL_RECORD.to_string(), LEDGER_RECORD.to_string()),
                (LABEL_MANAGED_BY.to_string(), "loraplane-api".to_string()),
            ])),
            owner_references: owner.map(|o| vec![o]),
            resource_version: stored.version.clone(),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(KEY.to_string(), ByteString(bytes))])),
        type_: Some("Opaque".into()),
        ..Secret::default()
    };
    let api = secrets(client, &ns);
    let written = match &stored.version {
        None => api.create(&PostParams::default(), &secret).await,
        Some(_) => {
            api.replace(&name(&job.name_any()), &PostParams::default(), &secret)
                .await
        }
    };
    let written = written.map_err(|source| match &source {
        kube::Error::Api(s) if s.code == 409 => LedgerError::Conflict,
        _ => LedgerError::Kube {
            action: "write",
            source,
        },
    })?;
    stored.version = written.metadata.resource_version;
    Ok(())
}

/// Records, once, what a paid order's ledger needs from the checkout: the draft order id the
/// storefront holds, the payment intent a refund names and the order's hash. Safe to repeat
/// (a redelivered webhook), and it keeps whatever the notifier recorded meanwhile. For a job
/// just created (`fresh`) the ledger is most likely not there yet: it is created without a
/// read first, one apiserver call on the hot path.
pub async fn record_payment(
    client: &kube::Client,
    job: &LoRATrainingJob,
    order_id: &str,
    payment_intent: Option<&str>,
    order_hash: &str,
    fresh: bool,
) -> Result<(), LedgerError> {
    let ns = job.namespace().unwrap_or_default();
    if fresh {
        let mut stored = Stored {
            ledger: Ledger {
                order_id: Some(order_id.to_string()),
                payment_intent: payment_intent.map(str::to_string),
                order_hash: Some(order_hash.to_string()),
                ..Ledger::default()
            },
            version: None,
        };
        match write(client, job, &mut stored).await {
            // The notifier saw the job first: merge into its ledger below.
            Err(LedgerError::Conflict) => {}
            other => return other,
        }
    }
    for _ in 0..5 {
        let mut stored = read(client, &ns, &job.name_any()).await?;
        let l = &mut stored.ledger;
        if l.order_id.is_some() && (payment_intent.is_none() || l.payment_intent.is_some()) {
            return Ok(());
        }
        l.order_id = Some(order_id.to_string());
        l.order_hash = Some(order_hash.to_string());
        if let Some(pi) = payment_intent {
            l.payment_intent = Some(pi.to_string());
        }
        match write(client, job, &mut stored).await {
            Err(LedgerError::Conflict) => continue,
            other => return other,
        }
    }
    Err(LedgerError::Conflict)
}
