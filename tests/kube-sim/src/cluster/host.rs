//! What a pod task needs from the kubelet it runs on: the API client, the kubelet
//! configuration, the log store, the data directory with the claim volumes, the live process
//! groups, and the hook that wakes the scheduling and kubelet loops.
//!
//! Kept apart from `runtime` (which owns a `Host` and runs the loops) so that `pod` can use
//! it without depending on the loops that start pod tasks.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::Store;
use tokio::sync::watch;

use super::error::ClusterError;
use super::kubelet::KubeletConfig;
use crate::logs::PodLogs;

/// The kubelet-side state shared by the runtime's loops and the pod tasks.
pub(super) struct Host {
    pub(super) client: kube::Client,
    pub(super) config: KubeletConfig,
    pub(super) logs: PodLogs,
    pub(super) data_dir: PathBuf,
    /// The watch cache of PersistentVolumeClaims (claim uids name the volume directories).
    pub(super) claims: Store<PersistentVolumeClaim>,
    /// Wakes the loops (they also run once a second).
    pub(super) wake: watch::Sender<()>,
    /// Process groups of live local processes, killed when the cluster is dropped.
    pub(super) process_groups: Mutex<HashMap<u32, String>>,
}

impl Host {
    /// Asks the scheduling and kubelet loops for a pass soon.
    pub(super) fn wake(&self) {
        self.wake.send_replace(());
    }

    /// The host directory of a claim, once a local-process pod has mounted it.
    pub(super) fn claim_dir(&self, namespace: &str, claim: &str) -> Option<PathBuf> {
        let pvc = self.claims.state().into_iter().find(|c| {
            c.metadata.namespace.as_deref() == Some(namespace)
                && c.metadata.name.as_deref() == Some(claim)
        })?;
        let dir = self.claim_path(namespace, claim, pvc.metadata.uid.as_deref()?);
        dir.exists().then_some(dir)
    }

    pub(super) fn claim_path(&self, namespace: &str, claim: &str, uid: &str) -> PathBuf {
        self.data_dir
            .join("claims")
            .join(namespace)
            .join(claim)
            .join(uid)
    }

    /// The claim's uid, from the watch cache.
    pub(super) fn claim_uid(&self, namespace: &str, claim: &str) -> Option<String> {
        self.claims
            .state()
            .into_iter()
            .find(|c| {
                c.metadata.namespace.as_deref() == Some(namespace)
                    && c.metadata.name.as_deref() == Some(claim)
                    && c.metadata.deletion_timestamp.is_none()
            })
            .and_then(|c| c.metadata.uid.clone())
    }

    pub(super) async fn patch_pod_status(
        &self,
        pod: &Pod,
        patch: &serde_json::Value,
    ) -> Result<(), ClusterError> {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        match api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(patch))
            .await
        {
            Ok(_) => Ok(()),
            // Deleted meanwhile: nothing left to report on.
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(source) => Err(ClusterError::PatchPodStatus {
                namespace: ns,
                name,
                source,
            }),
        }
    }
}
