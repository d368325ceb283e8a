//! The operator's view of every pod: per pod only what placement and stray-pod cleanup need
//! (namespace, name, the job-uid label, the node, the GPUs requested, whether it finished or
//! is being deleted), with GPUs in use per node and pods per job kept current from one watch.
//!
//! Why not a reflector `Store<Pod>`: at 10,000 jobs a store of whole pods is most of the
//! operator's memory, and computing capacity or finding a job's pods meant a scan of every
//! pod per reconcile (quadratic in the number of jobs). Here memory is a few hundred bytes a
//! pod and both questions are answered from maintained indexes. `PodIndex` is pure (fed
//! watch events), `PodCache` runs the watch.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, PoisonError, RwLock};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};

use crate::placement::pod_gpus;
use crate::resources::LABEL_JOB_UID;

/// (namespace, name) of a pod.
pub type PodKey = (String, String);

/// What the operator keeps of one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSummary {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The `loraplane.io/job-uid` label, on training pods.
    pub job_uid: Option<String>,
    /// The bound node.
    pub node: Option<String>,
    /// `nvidia.com/gpu` requested.
    pub gpus: i64,
    /// Phase Succeeded or Failed.
    pub finished: bool,
    /// Has a `deletionTimestamp`.
    pub deleting: bool,
}

impl PodSummary {
    /// Extracts the summary of a pod.
    pub fn of(pod: &Pod) -> PodSummary {
        PodSummary {
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            name: pod.metadata.name.clone().unwrap_or_default(),
            job_uid: pod
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_JOB_UID))
                .cloned(),
            node: pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .filter(|n| !n.is_empty()),
            gpus: pod_gpus(pod),
            finished: matches!(
                pod.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            ),
            deleting: pod.metadata.deletion_timestamp.is_some(),
        }
    }

    fn key(&self) -> PodKey {
        (self.namespace.clone(), self.name.clone())
    }

    /// GPUs this pod holds on its node: bound and not finished.
    fn held(&self) -> Option<(&str, i64)> {
        match &self.node {
            Some(n) if !self.finished && self.gpus > 0 => Some((n.as_str(), self.gpus)),
            _ => None,
        }
    }
}

/// Pods by key, by job uid, and GPUs held per node.
#[derive(Debug, Default)]
pub struct PodIndex {
    pods: HashMap<PodKey, PodSummary>,
    by_job: HashMap<String, BTreeSet<PodKey>>,
    gpus_by_node: HashMap<String, i64>,
    /// Pods of a re-list in progress, swapped in when it completes.
    relist: Option<Vec<PodSummary>>,
}

impl PodIndex {
    /// Adds or replaces a pod.
    pub fn upsert(&mut self, pod: PodSummary) {
        let key = pod.key();
        self.remove(&key);
        if let Some((node, gpus)) = pod.held() {
            *self.gpus_by_node.entry(node.to_string()).or_default() += gpus;
        }
        if let Some(uid) = &pod.job_uid {
            self.by_job
                .entry(uid.clone())
                .or_default()
                .insert(key.clone());
        }
        self.pods.insert(key, pod);
    }

    /// Forgets a pod.
    pub fn remove(&mut self, key: &PodKey) {
        let Some(old) = self.pods.remove(key) else {
            return;
        };
        if let Some((node, gpus)) = old.held()
            && let Some(used) = self.gpus_by_node.get_mut(node)
        {
            *used -= gpus;
            if *used <= 0 {
                self.gpus_by_node.remove(node);
            }
        }
        if let Some(uid) = &old.job_uid
            && let Some(set) = self.by_job.get_mut(uid)
        {
            set.remove(key);
            if set.is_empty() {
                self.by_job.remove(uid);
            }
        }
    }

    /// Applies one watch event. A re-list (`Init` … `InitDone`) replaces everything at its end,
    /// so pods deleted while the watch was down are forgotten.
    pub fn handle(&mut self, event: watcher::Event<Pod>) {
        match event {
            watcher::Event::Apply(p) => self.upsert(PodSummary::of(&p)),
            watcher::Event::Delete(p) => self.remove(&PodSummary::of(&p).key()),
            watcher::Event::Init => self.relist = Some(Vec::new()),
            watcher::Event::InitApply(p) => {
                self.relist
                    .get_or_insert_with(Vec::new)
                    .push(PodSummary::of(&p));
            }
            watcher::Event::InitDone => {
                let pods = self.relist.take().unwrap_or_default();
                *self = PodIndex::default();
                for p in pods {
                    self.upsert(p);
                }
            }
        }
    }

    /// GPUs held by bound, unfinished pods on a node.
    pub fn used_gpus(&self, node: &str) -> i64 {
        self.gpus_by_node.get(node).copied().unwrap_or(0)
    }

    /// The pods labelled with this job uid.
    pub fn pods_of_job(&self, uid: &str) -> Vec<PodSummary> {
        self.by_job
            .get(uid)
            .into_iter()
            .flatten()
            .filter_map(|k| self.pods.get(k).cloned())
            .collect()
    }

    /// How many pods are known.
    pub fn len(&self) -> usize {
        self.pods.len()
    }

    /// Whether no pod is known.
    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }
}

/// A `PodIndex` kept current by a watch on every pod of the cluster.
#[derive(Debug, Clone, Default)]
pub struct PodCache {
    index: Arc<RwLock<PodIndex>>,
}

impl PodCache {
    /// Starts the watch (retried with back-off); returns the cache it feeds and the watch task
    /// (the caller stops it).
    pub fn spawn(client: Client) -> (PodCache, tokio::task::JoinHandle<()>) {
        let cache = PodCache::default();
        let index = cache.index.clone();
        let stream = watcher(Api::<Pod>::all(client), watcher::Config::default()).default_backoff();
        let task = tokio::spawn(async move {
            futures::pin_mut!(stream);
            while let Some(event) = stream.next().await {
                match event {
                    Ok(e) => index
                        .write()
                        .unwrap_or_else(PoisonError::into_inner)
                        .handle(e),
                    Err(e) => tracing::debug!(error = %e, "pod watch error"),
                }
            }
        });
        (cache, task)
    }

    /// Reads the index.
    pub fn read<T>(&self, f: impl FnOnce(&PodIndex) -> T) -> T {
        f(&self.index.read().unwrap_or_else(PoisonError::into_inner))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Ev = watcher::Event<Pod>;

    fn pod(name: &str, job: Option<&str>, node: Option<&str>, gpus: i64, phase: &str) -> Pod {
        let mut labels = serde_json::Map::new();
        if let Some(j) = job {
            labels.insert(LABEL_JOB_UID.into(), j.into());
        }
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "ns", "labels": labels},
            "spec": {
                "nodeName": node,
                "containers": [{"name": "c", "resources": {"limits": {"nvidia.com/gpu": gpus.to_string()}}}],
            },
            "status": {"phase": phase},
        }))
        .unwrap()
    }

    fn apply(name: &str, job: Option<&str>, node: Option<&str>, gpus: i64, ph: &str) -> Ev {
        watcher::Event::Apply(pod(name, job, node, gpus, ph))
    }

    fn delete(name: &str, job: Option<&str>, node: Option<&str>, gpus: i64, ph: &str) -> Ev {
        watcher::Event::Delete(pod(name, job, node, gpus, ph))
    }

    fn init_apply(name: &str, job: Option<&str>, node: Option<&str>, gpus: i64, ph: &str) -> Ev {
        watcher::Event::InitApply(pod(name, job, node, gpus, ph))
    }

    #[test]
    fn gpus_per_node_follow_binding_finishing_and_deletion() {
        let mut ix = PodIndex::default();
        ix.handle(apply("a", Some("j1"), None, 2, "Pending"));
        assert_eq!(ix.used_gpus("n1"), 0, "an unbound pod holds nothing");
        ix.handle(apply("a", Some("j1"), Some("n1"), 2, "Running"));
        ix.handle(apply("b", None, Some("n1"), 1, "Running"));
        assert_eq!(ix.used_gpus("n1"), 3);
        ix.handle(apply("a", Some("j1"), Some("n1"), 2, "Succeeded"));
        assert_eq!(ix.used_gpus("n1"), 1, "a finished pod frees its GPUs");
        ix.handle(delete("b", None, Some("n1"), 1, "Running"));
        assert_eq!(ix.used_gpus("n1"), 0);
        assert_eq!(ix.len(), 1);
    }

    #[test]
    fn pods_are_found_by_job_uid() {
        let mut ix = PodIndex::default();
        ix.handle(apply("j1-0", Some("j1"), None, 1, "Failed"));
        ix.handle(apply("j1-1", Some("j1"), None, 1, "Pending"));
        ix.handle(apply("j2-0", Some("j2"), None, 1, "Pending"));
        let mut names: Vec<_> = ix.pods_of_job("j1").into_iter().map(|p| p.name).collect();
        names.sort();
        assert_eq!(names, ["j1-0", "j1-1"]);
        ix.handle(delete("j1-0", Some("j1"), None, 1, "Failed"));
        ix.handle(delete("j1-1", Some("j1"), None, 1, "Failed"));
        assert!(ix.pods_of_job("j1").is_empty());
        assert_eq!(ix.pods_of_job("j2").len(), 1);
    }

    #[test]
    fn a_relist_forgets_pods_deleted_while_the_watch_was_down() {
        let mut ix = PodIndex::default();
        ix.handle(apply("gone", Some("j1"), Some("n1"), 4, "Running"));
        ix.handle(watcher::Event::Init);
        ix.handle(init_apply("kept", Some("j2"), Some("n1"), 1, "Running"));
        assert_eq!(
            ix.used_gpus("n1"),
            4,
            "the old view serves until the re-list completes"
        );
        ix.handle(watcher::Event::InitDone);
        assert_eq!(ix.used_gpus("n1"), 1);
        assert!(ix.pods_of_job("j1").is_empty());
        assert_eq!(ix.pods_of_job("j2").len(), 1);
    }
}
