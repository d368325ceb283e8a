//! The operator's view of every pod: per pod only what placement and stray-pod cleanup need
//! (namespace, name, the job-uid label, the node, the GPUs requested, whether it finished or
//! is being deleted), with GPUs in use per node and pods per job kept current from one watch.
//! Training pods also keep the `PodView` the lifecycle decision reads, with the
//! resourceVersion it was taken at, so a reconcile need not GET the pod it just heard about.
//! That only holds if the reconcile a pod event causes runs after the event is in the cache,
//! so this watch is also the controller's pod trigger: each applied event sends the owning
//! job's reference (a relist's, when the relist is swapped in), replacing a second watch.
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
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use loraplane_crds::LoRATrainingJob;

use crate::placement::pod_gpus;
use crate::resources::LABEL_JOB_UID;
use crate::status::PodView;

/// (namespace, name) of a pod.
pub type PodKey = (String, String);

/// What the operator keeps of one pod.
#[derive(Debug, Clone, PartialEq)]
pub struct PodSummary {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The `loraplane.io/job-uid` label, on training pods.
    pub job_uid: Option<String>,
    /// The `LoRATrainingJob` that owns it, if one does.
    pub owner_job: Option<String>,
    /// The bound node.
    pub node: Option<String>,
    /// `nvidia.com/gpu` requested.
    pub gpus: i64,
    /// Phase Succeeded or Failed.
    pub finished: bool,
    /// Has a `deletionTimestamp`.
    pub deleting: bool,
    /// For training pods: what the lifecycle decision reads (its `node_exists` is left true;
    /// the reader asks the Node cache) and the resourceVersion it describes.
    pub view: Option<Arc<(PodView, Option<u64>)>>,
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
            owner_job: pod
                .metadata
                .owner_references
                .iter()
                .flatten()
                .find(|o| o.kind == "LoRATrainingJob" && o.api_version.starts_with("loraplane.io/"))
                .map(|o| o.name.clone()),
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
            view: pod
                .metadata
                .labels
                .as_ref()
                .is_some_and(|l| l.contains_key(LABEL_JOB_UID))
                .then(|| Arc::new((PodView::from_pod(pod, |_| true), resource_version(pod)))),
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

    /// Applies one watch event and returns the (namespace, name) of the jobs whose pods it
    /// changed, now that the index shows the change. A re-list (`Init` … `InitDone`) replaces
    /// everything at its end, so pods deleted while the watch was down are forgotten.
    pub fn handle(&mut self, event: watcher::Event<Pod>) -> Vec<(String, String)> {
        let owner = |p: &PodSummary| p.owner_job.clone().map(|j| (p.namespace.clone(), j));
        match event {
            watcher::Event::Apply(p) => {
                let p = PodSummary::of(&p);
                let changed = owner(&p);
                self.upsert(p);
                changed.into_iter().collect()
            }
            watcher::Event::Delete(p) => {
                let p = PodSummary::of(&p);
                self.remove(&p.key());
                owner(&p).into_iter().collect()
            }
            watcher::Event::Init => {
                self.relist = Some(Vec::new());
                Vec::new()
            }
            watcher::Event::InitApply(p) => {
                self.relist
                    .get_or_insert_with(Vec::new)
                    .push(PodSummary::of(&p));
                Vec::new()
            }
            watcher::Event::InitDone => {
                let pods = self.relist.take().unwrap_or_default();
                let mut changed: Vec<_> =
                    self.pods.values().chain(&pods).filter_map(owner).collect();
                changed.sort();
                changed.dedup();
                *self = PodIndex::default();
                for p in pods {
                    self.upsert(p);
                }
                changed
            }
        }
    }

    /// The cached view of a training pod and the resourceVersion it was taken at.
    pub fn view(&self, namespace: &str, name: &str) -> Option<Arc<(PodView, Option<u64>)>> {
        self.pods
            .get(&(namespace.to_string(), name.to_string()))
            .and_then(|p| p.view.clone())
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

/// A resourceVersion as a number, to tell an older copy of an object from a newer one. The
/// API calls them opaque, but every apiserver (etcd's revision) and kube-sim issues integers;
/// a version that does not parse is treated as unknown, and the reader asks the API.
pub fn resource_version(pod: &Pod) -> Option<u64> {
    pod.metadata.resource_version.as_deref()?.parse().ok()
}

/// Whether a cached copy at resourceVersion `cached` may stand in for a read, when `floor` is
/// the newest version a decision was already based on: an unknown version never does, and
/// without a floor nothing newer was ever seen by this replica.
pub fn cache_serves(cached: Option<u64>, floor: Option<u64>) -> bool {
    cached.is_some_and(|rv| floor.is_none_or(|f| rv >= f))
}

/// Jobs whose pods changed, in the order the pod cache applied the changes.
pub type JobTriggers = futures::channel::mpsc::UnboundedReceiver<ObjectRef<LoRATrainingJob>>;

/// A background watch that stops when dropped, so the caches of a `run` that returns (shutdown,
/// lost leadership) do not keep watching for a process that goes on, e.g. as a standby.
pub struct WatchTask(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for WatchTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A `PodIndex` kept current by a watch on every pod of the cluster.
#[derive(Debug, Clone, Default)]
pub struct PodCache {
    index: Arc<RwLock<PodIndex>>,
}

impl PodCache {
    /// Starts the watch (retried with back-off); returns the cache it feeds, the stream of
    /// jobs whose pods changed (sent after the cache shows the change: the controller's pod
    /// trigger) and the watch, which stops when dropped.
    pub fn spawn(client: Client) -> (PodCache, JobTriggers, WatchTask) {
        let cache = PodCache::default();
        let index = cache.index.clone();
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let stream = watcher(Api::<Pod>::all(client), watcher::Config::default()).default_backoff();
        let task = tokio::spawn(async move {
            futures::pin_mut!(stream);
            while let Some(event) = stream.next().await {
                match event {
                    Ok(e) => {
                        let changed = index
                            .write()
                            .unwrap_or_else(PoisonError::into_inner)
                            .handle(e);
                        for (ns, job) in changed {
                            // Closed only when the controller has stopped.
                            let _ = tx.unbounded_send(ObjectRef::new(&job).within(&ns));
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "pod watch error"),
                }
            }
        });
        (cache, rx, WatchTask(task))
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
    fn training_pods_keep_the_decisions_view_at_its_resource_version() {
        let mut ix = PodIndex::default();
        let mut p = pod("j1-0", Some("j1"), Some("n1"), 1, "Running");
        p.metadata.resource_version = Some("41".into());
        ix.handle(watcher::Event::Apply(p));
        let cached = ix.view("ns", "j1-0").unwrap();
        assert_eq!(cached.0.phase, crate::status::PodPhase::Running);
        assert_eq!(cached.0.node.as_deref(), Some("n1"));
        assert_eq!(cached.1, Some(41));
        ix.handle(apply("other", None, Some("n1"), 0, "Running"));
        assert!(ix.view("ns", "other").is_none(), "only training pods");
        assert!(ix.view("ns", "missing").is_none());
    }

    #[test]
    fn the_cache_serves_only_when_it_has_caught_up() {
        assert!(cache_serves(Some(7), None));
        assert!(cache_serves(Some(7), Some(7)));
        assert!(cache_serves(Some(9), Some(7)));
        assert!(!cache_serves(Some(6), Some(7)), "behind what was acted on");
        assert!(!cache_serves(None, None), "a version that did not parse");
    }

    #[test]
    fn events_name_the_owning_job_and_a_relist_names_them_all_when_it_lands() {
        let owned = |name: &str, job: &str| {
            let mut p = pod(name, Some("uid"), None, 1, "Pending");
            p.metadata.owner_references = Some(vec![
                k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                    api_version: "loraplane.io/v1alpha1".into(),
                    kind: "LoRATrainingJob".into(),
                    name: job.into(),
                    uid: "uid".into(),
                    ..Default::default()
                },
            ]);
            p
        };
        let mut ix = PodIndex::default();
        let job = |n: &str| vec![("ns".to_string(), n.to_string())];
        assert_eq!(
            ix.handle(watcher::Event::Apply(owned("a-0", "a"))),
            job("a")
        );
        assert!(
            ix.view("ns", "a-0").is_some(),
            "in the cache when the trigger goes"
        );
        assert!(
            ix.handle(apply("other", None, None, 0, "Running"))
                .is_empty()
        );
        assert_eq!(
            ix.handle(watcher::Event::Delete(owned("a-0", "a"))),
            job("a")
        );
        ix.handle(watcher::Event::Apply(owned("gone-0", "gone")));
        assert!(ix.handle(watcher::Event::Init).is_empty());
        assert!(
            ix.handle(watcher::Event::InitApply(owned("b-0", "b")))
                .is_empty()
        );
        // The job whose pod vanished during the outage is woken too.
        assert_eq!(
            ix.handle(watcher::Event::InitDone),
            [job("b"), job("gone")].concat()
        );
        assert!(ix.view("ns", "b-0").is_some() && ix.view("ns", "gone-0").is_none());
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
