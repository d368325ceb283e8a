//! The running cluster: reflectors on Pods, Nodes and PersistentVolumeClaims; the scheduling
//! loop (binds through `pods/{name}/binding`); the kubelet loop (starts a task per pod bound
//! to a simulated node, stops it on deletion, finalizes terminating pods with a grace-0
//! delete, removes the directories of deleted claims); and the node faults.
//!
//! Both loops run after every watch event (batched) and once a second, which is how an
//! unschedulable pod is retried once capacity frees.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, PersistentVolumeClaim, Pod, PodCondition, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::error::ClusterError;
use super::host::Host;
use super::kubelet::KubeletConfig;
use super::pod::{self, PodEnd, Stop};
use super::scheduler::{self, Decision, Resources};
use super::topology::{self, ANNOTATION_SIMULATED, Topology};
use crate::logs::PodLogs;

const UNREACHABLE_TAINT: &str = "node.kubernetes.io/unreachable";
/// How long a loop waits after a watch event for more to arrive. Each pass looks at every
/// pod, so a burst of events must cost one pass, not one per event.
const BATCH: Duration = Duration::from_millis(25);
/// The longest a loop lets events gather.
const MAX_BATCH: Duration = Duration::from_millis(250);
/// Concurrent writes of one scheduling pass.
const WRITERS: usize = 16;

/// A pod task on a kubelet.
struct Running {
    node: String,
    /// The pod's grace period, for when it vanishes without a graceful deletion.
    grace: Duration,
    stop: watch::Sender<Option<Stop>>,
    handle: JoinHandle<PodEnd>,
}

/// Where each simulated node comes from, and which are down.
#[derive(Default)]
struct NodeBook {
    /// name → (region, pool, index)
    nodes: BTreeMap<String, (String, String, u32)>,
    next_index: HashMap<String, u32>,
    lost: HashSet<String>,
    deleted: HashSet<String>,
}

/// State shared by the loops and the fault methods.
pub(super) struct Shared {
    /// What the pod tasks use too.
    pub(super) host: Arc<Host>,
    /// Whether `host.data_dir` is ours (a fresh temp dir) to delete on teardown.
    owned_data_dir: bool,
    topology: Topology,
    book: Mutex<NodeBook>,
    pods: Store<Pod>,
    nodes: Store<Node>,
    running: Mutex<HashMap<String, Running>>,
    started: Mutex<HashSet<String>>,
    finalizing: Mutex<HashSet<String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn uid(pod: &Pod) -> String {
    pod.metadata.uid.clone().unwrap_or_default()
}

fn phase(pod: &Pod) -> Option<&str> {
    pod.status.as_ref().and_then(|s| s.phase.as_deref())
}

fn terminal(pod: &Pod) -> bool {
    matches!(phase(pod), Some("Succeeded" | "Failed"))
}

/// Starts everything; see [`super::Cluster::start`].
pub(super) async fn start(
    client: kube::Client,
    topology: Topology,
    config: KubeletConfig,
    logs: PodLogs,
) -> Result<(Arc<Shared>, Vec<JoinHandle<()>>), ClusterError> {
    let data_dir = match &config.data_dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!(
            "kube-sim-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
        )),
    };
    std::fs::create_dir_all(&data_dir).map_err(|source| ClusterError::CreateDataDir {
        path: data_dir.display().to_string(),
        source,
    })?;

    let (wake, _) = watch::channel(());
    let mut tasks = Vec::new();
    let pods = reflect::<Pod>(Api::all(client.clone()), &wake, &mut tasks);
    let nodes = reflect::<Node>(Api::all(client.clone()), &wake, &mut tasks);
    let claims = reflect::<PersistentVolumeClaim>(Api::all(client.clone()), &wake, &mut tasks);

    let mut book = NodeBook::default();
    for region in &topology.regions {
        for pool in &region.pools {
            book.next_index.insert(pool.name.clone(), pool.nodes);
            for i in 0..pool.nodes {
                book.nodes.insert(
                    format!("{}-{i}", pool.name),
                    (region.name.clone(), pool.name.clone(), i),
                );
            }
        }
    }
    let shared = Arc::new(Shared {
        owned_data_dir: config.data_dir.is_none(),
        host: Arc::new(Host {
            client,
            config,
            logs,
            data_dir,
            claims,
            wake,
            process_groups: Mutex::new(HashMap::new()),
        }),
        topology,
        book: Mutex::new(book),
        pods,
        nodes,
        running: Mutex::new(HashMap::new()),
        started: Mutex::new(HashSet::new()),
        finalizing: Mutex::new(HashSet::new()),
    });
    for node in shared.topology.nodes() {
        shared.create_node(node).await?;
    }
    for (what, ready) in [
        ("pods", shared.pods.wait_until_ready().await.is_ok()),
        ("nodes", shared.nodes.wait_until_ready().await.is_ok()),
        (
            "persistentvolumeclaims",
            shared.host.claims.wait_until_ready().await.is_ok(),
        ),
    ] {
        if !ready {
            return Err(ClusterError::StartWatch(what));
        }
    }
    // The node store must show the nodes before the first scheduling pass, or early pods
    // would be reported unschedulable for want of nodes.
    for _ in 0..200 {
        let names: HashSet<String> = shared
            .nodes
            .state()
            .iter()
            .filter_map(|n| n.metadata.name.clone())
            .collect();
        if shared.node_names().iter().all(|n| names.contains(n)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let s = shared.clone();
    let mut rx = shared.host.wake.subscribe();
    tasks.push(tokio::spawn(async move {
        let mut assumed: HashMap<String, (String, Resources)> = HashMap::new();
        loop {
            let started = tokio::time::Instant::now();
            s.schedule_pass(&mut assumed).await;
            wait_for_wake(&mut rx, started.elapsed()).await;
        }
    }));
    let s = shared.clone();
    let mut rx = shared.host.wake.subscribe();
    tasks.push(tokio::spawn(async move {
        loop {
            let started = tokio::time::Instant::now();
            kubelet_pass(&s).await;
            wait_for_wake(&mut rx, started.elapsed()).await;
        }
    }));
    Ok((shared, tasks))
}

fn reflect<K>(api: Api<K>, wake: &watch::Sender<()>, tasks: &mut Vec<JoinHandle<()>>) -> Store<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let stream = reflector::reflector(
        writer,
        watcher(api, watcher::Config::default()).default_backoff(),
    );
    let wake = wake.clone();
    tasks.push(tokio::spawn(async move {
        stream
            .for_each(|_| {
                wake.send_replace(());
                futures::future::ready(())
            })
            .await;
    }));
    store
}

/// Waits for a watch event or a second, then lets events gather for [`BATCH`] or twice the
/// last pass's duration, whichever is longer (at most [`MAX_BATCH`]): with thousands of pods a pass is not free, and
/// the loops must leave most of the CPU to the apiserver and the clients under test.
async fn wait_for_wake(rx: &mut watch::Receiver<()>, last_pass: Duration) {
    if tokio::time::timeout(Duration::from_secs(1), rx.changed())
        .await
        .is_ok()
    {
        tokio::time::sleep(BATCH.max(last_pass * 2).min(MAX_BATCH)).await;
        rx.borrow_and_update();
    }
}

impl Shared {
    pub(super) fn node_names(&self) -> Vec<String> {
        let book = lock(&self.book);
        book.nodes
            .keys()
            .filter(|n| !book.deleted.contains(*n))
            .cloned()
            .collect()
    }

    pub(super) fn kill_all(&self) {
        for (_, r) in lock(&self.running).drain() {
            r.handle.abort();
        }
        for (pgid, _) in lock(&self.host.process_groups).drain() {
            pod::kill_group_now(pgid);
        }
        if self.owned_data_dir {
            // Best effort: a process that outlived SIGKILL's delivery may still hold files.
            let _ = std::fs::remove_dir_all(&self.host.data_dir);
        }
    }

    async fn create_node(&self, node: Node) -> Result<(), ClusterError> {
        let name = node.metadata.name.clone().unwrap_or_default();
        let api: Api<Node> = Api::all(self.host.client.clone());
        match api.create(&PostParams::default(), &node).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(source) => return Err(ClusterError::CreateNode { name, source }),
        }
        // Some apiservers drop status on create; write it through the subresource.
        let status = json!({ "status": node.status });
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .map_err(|source| ClusterError::PatchNode {
                name: name.clone(),
                source,
            })?;
        let mut book = lock(&self.book);
        book.deleted.remove(&name);
        book.lost.remove(&name);
        drop(book);
        self.host.wake();
        Ok(())
    }

    fn node_from_book(&self, name: &str) -> Option<Node> {
        let book = lock(&self.book);
        let (region, pool, index) = book.nodes.get(name)?;
        let (r, p) = self.topology.pool(pool)?;
        (r.name == *region).then(|| topology::node_for(r, p, *index))
    }

    async fn schedule_pass(&self, assumed: &mut HashMap<String, (String, Resources)>) {
        let pods = self.pods.state();
        // Assumed bindings last until the watch shows the pod bound (or gone).
        let unbound: HashSet<&str> = pods
            .iter()
            .filter(|p| scheduler::bound_node(p).is_none())
            .filter_map(|p| p.metadata.uid.as_deref())
            .collect();
        assumed.retain(|u, _| unbound.contains(u.as_str()));
        let mut pending: Vec<&Pod> = pods
            .iter()
            .map(|p| p.as_ref())
            .filter(|p| {
                scheduler::bound_node(p).is_none()
                    && p.metadata.deletion_timestamp.is_none()
                    && !terminal(p)
                    && !p
                        .metadata
                        .uid
                        .as_ref()
                        .is_some_and(|u| assumed.contains_key(u))
                    && p.spec.as_ref().is_some_and(|s| {
                        s.scheduler_name
                            .as_deref()
                            .is_none_or(|n| n == "default-scheduler")
                    })
            })
            .collect();
        if pending.is_empty() {
            return;
        }
        let nodes = self.nodes.state();
        let node_refs: Vec<&Node> = nodes
            .iter()
            .filter(|n| n.metadata.deletion_timestamp.is_none())
            .map(|n| n.as_ref())
            .collect();
        let mut used = scheduler::usage_by_node(pods.iter().map(|p| p.as_ref()));
        for (node, req) in assumed.values() {
            let entry = used.entry(node.clone()).or_default();
            for (k, v) in req {
                *entry.entry(k.clone()).or_default() += v;
            }
        }
        pending.sort_by(|a, b| {
            let prio = |p: &Pod| p.spec.as_ref().and_then(|s| s.priority).unwrap_or(0);
            prio(b)
                .cmp(&prio(a))
                .then_with(|| {
                    let t = |p: &Pod| p.metadata.creation_timestamp.clone().map(|t| t.0);
                    t(a).cmp(&t(b))
                })
                .then_with(|| a.metadata.name.cmp(&b.metadata.name))
        });
        // Decide everything first (assuming each binding, as kube-scheduler does), then write
        // concurrently: a burst of pods must not wait for one round trip per pod.
        let mut binds: Vec<(String, String, String, String)> = Vec::new();
        let mut patches: Vec<(String, String, serde_json::Value)> = Vec::new();
        for pod in pending {
            let ns = pod.metadata.namespace.clone().unwrap_or_default();
            let name = pod.metadata.name.clone().unwrap_or_default();
            match scheduler::schedule(pod, &node_refs, &used) {
                Decision::Bind(node) => {
                    let req = scheduler::pod_requests(pod);
                    let entry = used.entry(node.clone()).or_default();
                    for (k, v) in &req {
                        *entry.entry(k.clone()).or_default() += v;
                    }
                    assumed.insert(uid(pod), (node.clone(), req));
                    binds.push((ns, name, uid(pod), node));
                }
                Decision::Unschedulable(message) => {
                    let current = pod
                        .status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .and_then(|c| c.iter().find(|c| c.type_ == "PodScheduled"));
                    if current.is_some_and(|c| {
                        c.status == "False" && c.message.as_deref() == Some(message.as_str())
                    }) {
                        continue;
                    }
                    let cond = PodCondition {
                        type_: "PodScheduled".into(),
                        status: "False".into(),
                        reason: Some("Unschedulable".into()),
                        message: Some(message),
                        last_transition_time: Some(Time(k8s_openapi::jiff::Timestamp::now())),
                        ..PodCondition::default()
                    };
                    let conditions = pod::merge_conditions(pod, vec![cond]);
                    let patch = json!({"status": {"phase": "Pending", "conditions": conditions}});
                    patches.push((ns, name, patch));
                }
            }
        }
        let failed: Vec<String> = futures::stream::iter(binds)
            .map(|(ns, name, uid, node)| async move {
                let ok = bind(&self.host.client, &ns, &name, &uid, &node).await;
                (!ok).then_some(uid)
            })
            .buffer_unordered(WRITERS)
            .filter_map(futures::future::ready)
            .collect()
            .await;
        for uid in failed {
            assumed.remove(&uid);
        }
        futures::stream::iter(patches)
            .for_each_concurrent(WRITERS, |(ns, name, patch)| async move {
                let api: Api<Pod> = Api::namespaced(self.host.client.clone(), &ns);
                // A pod deleted meanwhile is no error; the next pass retries the rest.
                let _ = api
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await;
            })
            .await;
    }

    pub(super) async fn lose_node(&self, name: &str) -> Result<(), ClusterError> {
        if !lock(&self.book).nodes.contains_key(name) {
            return Err(ClusterError::UnknownNode(name.into()));
        }
        lock(&self.book).lost.insert(name.to_string());
        for r in self.take_running(name) {
            r.stop.send_replace(Some(Stop::Kill));
            let _ = r.handle.await;
        }
        let api: Api<Node> = Api::all(self.host.client.clone());
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        let status = json!({"status": {"conditions": topology::ready_conditions(false)}});
        api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .map_err(|source| ClusterError::PatchNode {
                name: name.into(),
                source,
            })?;
        let mut taints = self.current_taints(name).await?;
        for effect in ["NoSchedule", "NoExecute"] {
            if !taints
                .iter()
                .any(|t| t.key == UNREACHABLE_TAINT && t.effect == effect)
            {
                taints.push(Taint {
                    key: UNREACHABLE_TAINT.into(),
                    value: None,
                    effect: effect.into(),
                    time_added: Some(now.clone()),
                });
            }
        }
        self.patch_taints(name, taints).await?;
        for pod in self.pods_on(name).await {
            let patch = pod::disrupted_status(
                &pod,
                None,
                "NodeLost",
                &format!(
                    "Node {name} which was running pod {} is unresponsive",
                    pod.metadata.name.as_deref().unwrap_or("")
                ),
                "DeletionByTaintManager",
                "Taint manager: deleting due to NoExecute taint",
            );
            self.host.patch_pod_status(&pod, &patch).await?;
        }
        self.host.wake();
        Ok(())
    }

    pub(super) async fn restore_node(&self, name: &str) -> Result<(), ClusterError> {
        let Some(node) = self.node_from_book(name) else {
            return Err(ClusterError::UnknownNode(name.into()));
        };
        let api: Api<Node> = Api::all(self.host.client.clone());
        let exists = api
            .get_opt(name)
            .await
            .map_err(|source| ClusterError::PatchNode {
                name: name.into(),
                source,
            })?
            .is_some();
        if !exists {
            return self.create_node(node).await;
        }
        let taints: Vec<Taint> = self
            .current_taints(name)
            .await?
            .into_iter()
            .filter(|t| t.key != UNREACHABLE_TAINT)
            .collect();
        self.patch_taints(name, taints).await?;
        let status = json!({"status": {"conditions": topology::ready_conditions(true)}});
        api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .map_err(|source| ClusterError::PatchNode {
                name: name.into(),
                source,
            })?;
        lock(&self.book).lost.remove(name);
        self.host.wake();
        Ok(())
    }

    pub(super) async fn add_nodes(
        &self,
        pool: &str,
        count: u32,
    ) -> Result<Vec<String>, ClusterError> {
        let Some((region, p)) = self.topology.pool(pool) else {
            return Err(ClusterError::UnknownPool(pool.into()));
        };
        let mut names = Vec::new();
        for _ in 0..count {
            let index = {
                let mut book = lock(&self.book);
                let next = book.next_index.entry(pool.to_string()).or_insert(0);
                let index = *next;
                *next += 1;
                book.nodes.insert(
                    format!("{pool}-{index}"),
                    (region.name.clone(), pool.to_string(), index),
                );
                index
            };
            let node = topology::node_for(region, p, index);
            names.push(node.metadata.name.clone().unwrap_or_default());
            self.create_node(node).await?;
        }
        Ok(names)
    }

    fn take_running(&self, node: &str) -> Vec<Running> {
        let mut running = lock(&self.running);
        let uids: Vec<String> = running
            .iter()
            .filter(|(_, r)| r.node == node)
            .map(|(u, _)| u.clone())
            .collect();
        uids.iter().filter_map(|u| running.remove(u)).collect()
    }

    async fn current_taints(&self, name: &str) -> Result<Vec<Taint>, ClusterError> {
        let api: Api<Node> = Api::all(self.host.client.clone());
        let node = api
            .get(name)
            .await
            .map_err(|source| ClusterError::PatchNode {
                name: name.into(),
                source,
            })?;
        Ok(node.spec.and_then(|s| s.taints).unwrap_or_default())
    }

    async fn patch_taints(&self, name: &str, taints: Vec<Taint>) -> Result<(), ClusterError> {
        let api: Api<Node> = Api::all(self.host.client.clone());
        let patch = json!({"spec": {"taints": taints}});
        api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|source| ClusterError::PatchNode {
                name: name.into(),
                source,
            })?;
        Ok(())
    }

    /// The node's pods that have not terminated, read from the apiserver (not the cache) so
    /// that a pod bound a moment ago is included.
    async fn pods_on(&self, node: &str) -> Vec<Pod> {
        let api: Api<Pod> = Api::all(self.host.client.clone());
        let listed = api.list(&ListParams::default()).await;
        let pods = match listed {
            Ok(list) => list.items,
            Err(_) => self
                .pods
                .state()
                .iter()
                .map(|p| p.as_ref().clone())
                .collect(),
        };
        pods.into_iter()
            .filter(|p| scheduler::bound_node(p) == Some(node) && !terminal(p))
            .collect()
    }
}

/// Binds through the `binding` subresource; falls back to patching `spec.nodeName` when the
/// apiserver lacks it. Returns whether the pod is now bound to `node`.
async fn bind(client: &kube::Client, ns: &str, name: &str, uid: &str, node: &str) -> bool {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let binding = json!({
        "apiVersion": "v1",
        "kind": "Binding",
        "metadata": {"name": name, "namespace": ns, "uid": uid},
        "target": {"apiVersion": "v1", "kind": "Node", "name": node},
    });
    match api
        .create_subresource::<serde_json::Value, serde_json::Value>(
            "binding",
            name,
            &PostParams::default(),
            &binding,
        )
        .await
    {
        Ok(_) => true,
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 405 => {
            let patch = json!({"spec": {"nodeName": node}});
            api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .is_ok()
        }
        Err(_) => false,
    }
}

/// One kubelet pass over every pod; see the module docs.
async fn kubelet_pass(shared: &Arc<Shared>) {
    let pods = shared.pods.state();
    let live_nodes: HashSet<String> = {
        let book = lock(&shared.book);
        shared
            .nodes
            .state()
            .iter()
            .filter(|n| {
                n.metadata
                    .annotations
                    .as_ref()
                    .is_some_and(|a| a.contains_key(ANNOTATION_SIMULATED))
            })
            .filter_map(|n| n.metadata.name.clone())
            .filter(|n| !book.lost.contains(n))
            .collect()
    };
    let all_nodes: HashSet<String> = shared
        .nodes
        .state()
        .iter()
        .filter_map(|n| n.metadata.name.clone())
        .collect();
    let mut seen: HashSet<&str> = HashSet::with_capacity(pods.len());
    {
        // Held for the whole loop (which never awaits), so the common case costs a lookup.
        let mut started = lock(&shared.started);
        for pod in &pods {
            let uid_ref = pod.metadata.uid.as_deref().unwrap_or("");
            seen.insert(uid_ref);
            let Some(node) = scheduler::bound_node(pod) else {
                continue;
            };
            // The common case, cheaply: a pod already handed to its task.
            if pod.metadata.deletion_timestamp.is_none() && started.contains(uid_ref) {
                continue;
            }
            let uid = uid_ref.to_string();
            if pod.metadata.deletion_timestamp.is_some() {
                let running = lock(&shared.running)
                    .get(&uid)
                    .map(|r| {
                        if r.stop.borrow().is_none() {
                            r.stop
                                .send_replace(Some(Stop::Delete(pod::grace_period(pod))));
                        }
                    })
                    .is_some();
                let can_finalize =
                    live_nodes.contains(node) || terminal(pod) || !all_nodes.contains(node);
                if !running && can_finalize && lock(&shared.finalizing).insert(uid.clone()) {
                    let s = shared.clone();
                    let pod = pod.as_ref().clone();
                    tokio::spawn(async move { pod::finalize_delete(&s.host, &pod).await });
                }
                continue;
            }
            if !live_nodes.contains(node) || terminal(pod) {
                continue;
            }
            if !started.insert(uid.clone()) {
                continue;
            }
            let (stop, rx) = watch::channel(None);
            let s = shared.clone();
            let p = pod.as_ref().clone();
            let u = uid.clone();
            let handle = tokio::spawn(async move {
                let end = pod::run(&s.host, p, rx).await;
                // A fault may have taken the handle already; then it reads `end`.
                lock(&s.running).remove(&u);
                end
            });
            lock(&shared.running).insert(
                uid,
                Running {
                    node: node.to_string(),
                    grace: pod::grace_period(pod),
                    stop,
                    handle,
                },
            );
        }
    }
    // Pods removed outright (an apiserver without graceful pod deletion, or a grace-0
    // delete): terminate what still runs within the pod's grace period; nothing to report.
    let forgotten: Vec<String> = {
        let running = lock(&shared.running);
        for (_, r) in running.iter().filter(|(u, _)| !seen.contains(u.as_str())) {
            if r.stop.borrow().is_none() {
                r.stop.send_replace(Some(Stop::Shutdown(r.grace)));
            }
        }
        // A pod's directory goes once its task has ended (it removes itself from `running`).
        let mut started = lock(&shared.started);
        let f: Vec<String> = started
            .iter()
            .filter(|u| !seen.contains(u.as_str()) && !running.contains_key(*u))
            .cloned()
            .collect();
        for u in &f {
            started.remove(u);
        }
        f
    };
    lock(&shared.finalizing).retain(|u| seen.contains(u.as_str()));
    for u in forgotten {
        let _ = tokio::fs::remove_dir_all(shared.host.data_dir.join("pods").join(u)).await;
    }
    remove_deleted_claims(shared).await;
}

/// Deletes claim directories whose claim no longer exists.
async fn remove_deleted_claims(shared: &Shared) {
    let live: HashSet<String> = shared
        .host
        .claims
        .state()
        .iter()
        .filter_map(|c| c.metadata.uid.clone())
        .collect();
    let root = shared.host.data_dir.join("claims");
    let Ok(namespaces) = std::fs::read_dir(&root) else {
        return;
    };
    for ns in namespaces.flatten() {
        let Ok(claims) = std::fs::read_dir(ns.path()) else {
            continue;
        };
        for claim in claims.flatten() {
            let Ok(uids) = std::fs::read_dir(claim.path()) else {
                continue;
            };
            for u in uids.flatten() {
                if !live.contains(&u.file_name().to_string_lossy().to_string()) {
                    let _ = tokio::fs::remove_dir_all(u.path()).await;
                }
            }
            // Only succeeds once empty.
            let _ = std::fs::remove_dir(claim.path());
        }
    }
}

/// Spot preemption; see the module docs.
pub(super) async fn preempt_node(
    shared: &Arc<Shared>,
    name: &str,
    recreate_after: Option<Duration>,
) -> Result<(), ClusterError> {
    if !lock(&shared.book).nodes.contains_key(name) {
        return Err(ClusterError::UnknownNode(name.into()));
    }
    // The kubelet stops starting pods here from now on.
    lock(&shared.book).lost.insert(name.to_string());
    let mut ended: HashMap<String, PodEnd> = HashMap::new();
    let stopping: Vec<(String, Running)> = {
        let mut running = lock(&shared.running);
        let uids: Vec<String> = running
            .iter()
            .filter(|(_, r)| r.node == name)
            .map(|(u, _)| u.clone())
            .collect();
        uids.into_iter()
            .filter_map(|u| running.remove(&u).map(|r| (u, r)))
            .collect()
    };
    for (_, r) in &stopping {
        r.stop.send_replace(Some(Stop::Shutdown(
            shared.host.config.shutdown_grace_period,
        )));
    }
    for (u, r) in stopping {
        if let Ok(end) = r.handle.await {
            ended.insert(u, end);
        }
    }
    for pod in shared.pods_on(name).await {
        let statuses = match ended.remove(&uid(&pod)) {
            Some(PodEnd::Reported) => continue,
            Some(PodEnd::Stopped(statuses)) => Some(statuses),
            None => None,
        };
        let patch = pod::disrupted_status(
            &pod,
            statuses,
            "Terminated",
            "Pod was terminated in response to imminent node shutdown.",
            "TerminationByKubelet",
            "Pod was terminated in response to imminent node shutdown.",
        );
        shared.host.patch_pod_status(&pod, &patch).await?;
    }
    let api: Api<Node> = Api::all(shared.host.client.clone());
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(source) => {
            return Err(ClusterError::DeleteNode {
                name: name.into(),
                source,
            });
        }
    }
    lock(&shared.book).deleted.insert(name.to_string());
    shared.host.wake();
    if let Some(delay) = recreate_after {
        let s = shared.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            // Nobody to report to; a failed recreation shows as a missing node.
            let _ = s.restore_node(&name).await;
        });
    }
    Ok(())
}
