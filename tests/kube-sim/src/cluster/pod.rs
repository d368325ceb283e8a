//! One pod's life on a simulated kubelet: the status writes (Pending/ContainerCreating →
//! Running → Succeeded/Failed), scripted containers, local processes with their volumes,
//! env and logs, graceful termination, and the final grace-0 delete of a terminating pod.
//!
//! Differences from a real kubelet: every pod runs once, whatever its `restartPolicy`; init
//! containers and probes are ignored; all containers start together; volumes other than
//! PVC, emptyDir, Secret and ConfigMap are empty directories; file modes are not applied;
//! a local process starts with only `PATH` from the host plus `HOME` (a per-pod directory),
//! `HOSTNAME` and the container's env.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    ConfigMap, Container, ContainerState, ContainerStateRunning, ContainerStateTerminated,
    ContainerStateWaiting, ContainerStatus, Pod, PodCondition, Secret,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio::sync::watch;

use super::host::Host;
use super::kubelet::{self, Mode, PathMap, Script};

/// A Secret or ConfigMap entry: key (or item path) and content.
type KeyBytes = (String, Vec<u8>);

/// Kubernetes' cap on a termination message.
const MAX_TERMINATION_MESSAGE: usize = 4096;

/// Why a pod task must stop early.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Stop {
    /// The pod is being deleted with this grace period: terminate, report, finalize.
    Delete(Duration),
    /// The node shuts down (preemption) with at most this grace period; the caller reports.
    Shutdown(Duration),
    /// The node is gone: kill at once; the caller reports.
    Kill,
}

/// How a pod task ended.
#[derive(Debug)]
pub(super) enum PodEnd {
    /// The task wrote the final status itself.
    Reported,
    /// Stopped by a node fault; these are the containers' final states for the caller to
    /// report.
    Stopped(Vec<ContainerStatus>),
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

/// The pod's grace period: the one set by the deletion, else the spec's, else 30 s.
pub(super) fn grace_period(pod: &Pod) -> Duration {
    let secs = pod
        .metadata
        .deletion_grace_period_seconds
        .or_else(|| {
            pod.spec
                .as_ref()
                .and_then(|s| s.termination_grace_period_seconds)
        })
        .unwrap_or(30);
    Duration::from_secs(u64::try_from(secs).unwrap_or(0))
}

/// The pod's conditions with `updates` applied by type (a condition whose status does not
/// change keeps its transition time).
pub(super) fn merge_conditions(pod: &Pod, updates: Vec<PodCondition>) -> Vec<PodCondition> {
    let mut conditions: Vec<PodCondition> = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    for mut update in updates {
        match conditions.iter_mut().find(|c| c.type_ == update.type_) {
            Some(existing) => {
                if existing.status == update.status {
                    update.last_transition_time = existing.last_transition_time.clone();
                }
                *existing = update;
            }
            None => conditions.push(update),
        }
    }
    conditions
}

fn condition(
    type_: &str,
    status: bool,
    reason: Option<&str>,
    message: Option<&str>,
) -> PodCondition {
    PodCondition {
        type_: type_.into(),
        status: if status { "True" } else { "False" }.into(),
        reason: reason.map(Into::into),
        message: message.map(Into::into),
        last_transition_time: Some(now()),
        ..PodCondition::default()
    }
}

fn container_status(
    pod: &Pod,
    c: &Container,
    state: ContainerState,
    ready: bool,
) -> ContainerStatus {
    let started = state.running.is_some();
    ContainerStatus {
        name: c.name.clone(),
        image: c.image.clone().unwrap_or_default(),
        image_id: format!("kube-sim://{}", c.image.as_deref().unwrap_or("")),
        container_id: Some(format!(
            "kube-sim://{}-{}",
            pod.metadata.uid.as_deref().unwrap_or(""),
            c.name
        )),
        ready,
        restart_count: 0,
        started: Some(started),
        state: Some(state),
        ..ContainerStatus::default()
    }
}

fn containers(pod: &Pod) -> &[Container] {
    pod.spec
        .as_ref()
        .map(|s| s.containers.as_slice())
        .unwrap_or_default()
}

/// The status patch of a pod a node fault ended (see the `cluster` module docs).
pub(super) fn disrupted_status(
    pod: &Pod,
    statuses: Option<Vec<ContainerStatus>>,
    reason: &str,
    message: &str,
    disruption_reason: &str,
    disruption_message: &str,
) -> serde_json::Value {
    let statuses = statuses.unwrap_or_else(|| {
        containers(pod)
            .iter()
            .map(|c| {
                let state = ContainerState {
                    terminated: Some(ContainerStateTerminated {
                        exit_code: 137,
                        reason: Some("ContainerStatusUnknown".into()),
                        message: Some(
                            "The container could not be located when the pod was terminated".into(),
                        ),
                        finished_at: Some(now()),
                        ..ContainerStateTerminated::default()
                    }),
                    ..ContainerState::default()
                };
                container_status(pod, c, state, false)
            })
            .collect()
    });
    let conditions = merge_conditions(
        pod,
        vec![
            condition(
                "DisruptionTarget",
                true,
                Some(disruption_reason),
                Some(disruption_message),
            ),
            condition("Ready", false, Some("PodFailed"), None),
            condition("ContainersReady", false, Some("PodFailed"), None),
        ],
    );
    json!({"status": {
        "phase": "Failed",
        "reason": reason,
        "message": message,
        "conditions": conditions,
        "containerStatuses": statuses,
    }})
}

/// Completes the deletion of a terminating pod whose containers are gone.
pub(super) async fn finalize_delete(shared: &Host, pod: &Pod) {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(shared.client.clone(), &ns);
    // Already gone is fine; anything else is retried on the next kubelet pass.
    let _ = api
        .delete(&name, &DeleteParams::default().grace_period(0))
        .await;
    shared.wake();
}

/// Waits until a stop is requested; `None` when nobody can request one any more.
async fn wait_stop(rx: &mut watch::Receiver<Option<Stop>>) -> Option<Stop> {
    let got = rx.wait_for(Option::is_some).await.ok().and_then(|r| *r);
    match got {
        Some(stop) => Some(stop),
        // The sender is gone (cluster dropped): never stop on that account.
        None => std::future::pending().await,
    }
}

/// How one container ended.
struct Ended {
    status: ContainerStatus,
    exit_code: i32,
}

/// Runs a pod on its node until its containers end or `stop` says otherwise.
pub(super) async fn run(
    shared: &Arc<Host>,
    pod: Pod,
    mut stop: watch::Receiver<Option<Stop>>,
) -> PodEnd {
    let creating: Vec<ContainerStatus> = containers(&pod)
        .iter()
        .map(|c| {
            let state = ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some("ContainerCreating".into()),
                    message: None,
                }),
                ..ContainerState::default()
            };
            container_status(&pod, c, state, false)
        })
        .collect();
    let conditions = merge_conditions(
        &pod,
        vec![
            condition("PodScheduled", true, None, None),
            condition("Initialized", true, None, None),
            condition("ContainersReady", false, Some("ContainersNotReady"), None),
            condition("Ready", false, Some("ContainersNotReady"), None),
        ],
    );
    let start_time = now();
    let patch = json!({"status": {
        "phase": "Pending",
        "hostIP": "127.0.0.1",
        "hostIPs": [{"ip": "127.0.0.1"}],
        "podIP": "127.0.0.1",
        "podIPs": [{"ip": "127.0.0.1"}],
        "startTime": start_time,
        "conditions": conditions,
        "containerStatuses": creating,
    }});
    let _ = shared.patch_pod_status(&pod, &patch).await;

    // Prepare each container; a config error (missing Secret, bad annotation) leaves the pod
    // waiting with `CreateContainerConfigError`, retried every second, as a kubelet does.
    let prepared = loop {
        match prepare(shared, &pod).await {
            Ok(p) => break p,
            Err(message) => {
                let waiting: Vec<ContainerStatus> = containers(&pod)
                    .iter()
                    .map(|c| {
                        let state = ContainerState {
                            waiting: Some(ContainerStateWaiting {
                                reason: Some("CreateContainerConfigError".into()),
                                message: Some(message.clone()),
                            }),
                            ..ContainerState::default()
                        };
                        container_status(&pod, c, state, false)
                    })
                    .collect();
                let patch = json!({"status": {"containerStatuses": waiting}});
                let _ = shared.patch_pod_status(&pod, &patch).await;
                let stopped = tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => None,
                    s = wait_stop(&mut stop) => s,
                };
                match stopped {
                    None => continue,
                    Some(Stop::Delete(_)) => {
                        finalize_delete(shared, &pod).await;
                        return PodEnd::Reported;
                    }
                    Some(_) => return PodEnd::Stopped(Vec::new()),
                }
            }
        }
    };

    let started_at = now();
    let running: Vec<ContainerStatus> = containers(&pod)
        .iter()
        .map(|c| {
            let state = ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: Some(started_at.clone()),
                }),
                ..ContainerState::default()
            };
            container_status(&pod, c, state, true)
        })
        .collect();
    let conditions = merge_conditions(
        &pod,
        vec![
            condition("PodScheduled", true, None, None),
            condition("Initialized", true, None, None),
            condition("ContainersReady", true, None, None),
            condition("Ready", true, None, None),
        ],
    );
    let patch = json!({"status": {
        "phase": "Running",
        "conditions": conditions,
        "containerStatuses": running,
    }});
    let _ = shared.patch_pod_status(&pod, &patch).await;

    let runs = prepared.into_iter().map(|p| {
        let stop = stop.clone();
        let shared = shared.clone();
        let pod = &pod;
        async move {
            match p {
                Prepared::Scripted(c, script) => run_script(&shared, pod, &c, &script, stop).await,
                Prepared::Local(c, local) => run_local(&shared, pod, &c, local, stop).await,
            }
        }
    });
    let ended: Vec<Ended> = futures::future::join_all(runs).await;
    let statuses: Vec<ContainerStatus> = ended.iter().map(|e| e.status.clone()).collect();
    let stopped = *stop.borrow();
    match stopped {
        Some(Stop::Shutdown(_) | Stop::Kill) => PodEnd::Stopped(statuses),
        other => {
            let ok = ended.iter().all(|e| e.exit_code == 0);
            let conditions = merge_conditions(
                &pod,
                vec![
                    condition("ContainersReady", false, Some("PodCompleted"), None),
                    condition("Ready", false, Some("PodCompleted"), None),
                ],
            );
            let patch = json!({"status": {
                "phase": if ok { "Succeeded" } else { "Failed" },
                "conditions": conditions,
                "containerStatuses": statuses,
            }});
            let _ = shared.patch_pod_status(&pod, &patch).await;
            if matches!(other, Some(Stop::Delete(_))) {
                finalize_delete(shared, &pod).await;
            }
            shared.wake();
            PodEnd::Reported
        }
    }
}

/// A container ready to run.
enum Prepared {
    Scripted(Container, Script),
    Local(Container, LocalRun),
}

/// A local process, fully resolved.
struct LocalRun {
    argv: Vec<String>,
    env: Vec<(String, String)>,
    cwd: PathBuf,
    termination_file: PathBuf,
}

async fn prepare(shared: &Host, pod: &Pod) -> Result<Vec<Prepared>, String> {
    let mut modes = Vec::new();
    for c in containers(pod) {
        modes.push((c.clone(), kubelet::choose_mode(pod, c, &shared.config)?));
    }
    let local = modes.iter().any(|(_, m)| matches!(m, Mode::Local(_)));
    let paths = if local {
        Some(mount_volumes(shared, pod).await?)
    } else {
        None
    };
    let mut out = Vec::new();
    for (c, mode) in modes {
        match (mode, &paths) {
            (Mode::Scripted(s), _) => out.push(Prepared::Scripted(c, s)),
            (Mode::Local(entrypoint), Some((pod_map, pod_dir))) => {
                let run = resolve_local(shared, pod, &c, &entrypoint, pod_map, pod_dir).await?;
                out.push(Prepared::Local(c, run));
            }
            (Mode::Local(_), None) => return Err("volumes were not mounted".into()),
        }
    }
    Ok(out)
}

fn namespace(pod: &Pod) -> String {
    pod.metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into())
}

async fn get_secret(shared: &Host, ns: &str, name: &str) -> Result<Option<Secret>, String> {
    Api::<Secret>::namespaced(shared.client.clone(), ns)
        .get_opt(name)
        .await
        .map_err(|e| format!("get secret {ns}/{name}: {e}"))
}

async fn get_config_map(shared: &Host, ns: &str, name: &str) -> Result<Option<ConfigMap>, String> {
    Api::<ConfigMap>::namespaced(shared.client.clone(), ns)
        .get_opt(name)
        .await
        .map_err(|e| format!("get configmap {ns}/{name}: {e}"))
}

fn secret_data(s: &Secret) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = s
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect();
    for (k, v) in s.string_data.iter().flatten() {
        out.push((k.clone(), v.clone().into_bytes()));
    }
    out
}

fn config_map_data(c: &ConfigMap) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = c
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
        .collect();
    for (k, v) in c.binary_data.iter().flatten() {
        out.push((k.clone(), v.0.clone()));
    }
    out
}

fn io_err(what: &str, path: &Path) -> impl Fn(std::io::Error) -> String {
    let msg = format!("{what} {}", path.display());
    move |e| format!("{msg}: {e}")
}

/// Creates the pod's volume directories, writes Secret/ConfigMap files and returns the
/// pod-wide path map and the pod directory.
async fn mount_volumes(shared: &Host, pod: &Pod) -> Result<(PathMap, PathBuf), String> {
    let ns = namespace(pod);
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let pod_dir = shared.data_dir.join("pods").join(&uid);
    tokio::fs::create_dir_all(pod_dir.join("home"))
        .await
        .map_err(io_err("create", &pod_dir))?;
    let mut hosts: HashMap<String, PathBuf> = HashMap::new();
    // (directory, files) written once the path map is known.
    let mut files: Vec<(PathBuf, Vec<KeyBytes>)> = Vec::new();
    let spec = pod.spec.as_ref();
    for vol in spec.and_then(|s| s.volumes.as_deref()).unwrap_or_default() {
        let own_dir = pod_dir.join("volumes").join(&vol.name);
        let host = if let Some(pvc) = &vol.persistent_volume_claim {
            let claim_uid = shared
                .claim_uid(&ns, &pvc.claim_name)
                .ok_or_else(|| format!("persistentvolumeclaim \"{}\" not found", pvc.claim_name))?;
            shared.claim_path(&ns, &pvc.claim_name, &claim_uid)
        } else if let Some(sv) = &vol.secret {
            let name = sv.secret_name.clone().unwrap_or_default();
            let data = match get_secret(shared, &ns, &name).await? {
                Some(s) => secret_data(&s),
                None if sv.optional == Some(true) => Vec::new(),
                None => return Err(format!("secret \"{name}\" not found")),
            };
            files.push((
                own_dir.clone(),
                select_items(data, sv.items.as_deref(), &name)?,
            ));
            own_dir
        } else if let Some(cv) = &vol.config_map {
            let name = cv.name.clone();
            let data = match get_config_map(shared, &ns, &name).await? {
                Some(c) => config_map_data(&c),
                None if cv.optional == Some(true) => Vec::new(),
                None => return Err(format!("configmap \"{name}\" not found")),
            };
            files.push((
                own_dir.clone(),
                select_items(data, cv.items.as_deref(), &name)?,
            ));
            own_dir
        } else {
            own_dir
        };
        tokio::fs::create_dir_all(&host)
            .await
            .map_err(io_err("create", &host))?;
        hosts.insert(vol.name.clone(), host);
    }
    let mut map = PathMap::default();
    for c in containers(pod) {
        for m in c.volume_mounts.iter().flatten() {
            let Some(host) = hosts.get(&m.name) else {
                return Err(format!(
                    "container {}: volume {:?} not found",
                    c.name, m.name
                ));
            };
            let host = match m.sub_path.as_deref().filter(|s| !s.is_empty()) {
                Some(sub) => {
                    let h = host.join(sub);
                    tokio::fs::create_dir_all(&h)
                        .await
                        .map_err(io_err("create", &h))?;
                    h
                }
                None => host.clone(),
            };
            map.add(&m.mount_path, &host);
        }
    }
    // Termination-message paths are mapped before the files are written, so a mounted config
    // that names the container's `terminationMessagePath` points at the file the kubelet reads.
    // A path two containers share maps to the first one's file.
    for c in containers(pod) {
        let path = termination_message_path(c);
        if map.host_path(path).is_none() {
            map.add(path, &termination_file(&pod_dir, c));
        }
    }
    for (dir, entries) in files {
        for (path, bytes) in entries {
            let file = dir.join(&path);
            if let Some(parent) = file.parent() {
                tokio::fs::create_dir_all(parent)
                    .await
                    .map_err(io_err("create", parent))?;
            }
            // Text files get the same path rewriting as the command line (module docs of
            // `kubelet`), so a mounted config naming `/work` points at the claim.
            let bytes = match String::from_utf8(bytes) {
                Ok(text) => map.rewrite(&text).into_bytes(),
                Err(e) => e.into_bytes(),
            };
            tokio::fs::write(&file, bytes)
                .await
                .map_err(io_err("write", &file))?;
        }
    }
    Ok((map, pod_dir))
}

fn select_items(
    data: Vec<(String, Vec<u8>)>,
    items: Option<&[k8s_openapi::api::core::v1::KeyToPath]>,
    source: &str,
) -> Result<Vec<(String, Vec<u8>)>, String> {
    let Some(items) = items.filter(|i| !i.is_empty()) else {
        return Ok(data);
    };
    items
        .iter()
        .map(|item| {
            data.iter()
                .find(|(k, _)| *k == item.key)
                .map(|(_, v)| (item.path.clone(), v.clone()))
                .ok_or_else(|| format!("couldn't find key {} in {source}", item.key))
        })
        .collect()
}

/// Expands `$(VAR)` references the way Kubernetes does (`$$` escapes; unknown names stay).
fn expand(s: &str, vars: &HashMap<String, String>) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
            && let Some(v) = vars.get(&inner[..end])
        {
            out.push_str(v);
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// Where a container writes its termination message, inside the container.
fn termination_message_path(c: &Container) -> &str {
    c.termination_message_path
        .as_deref()
        .unwrap_or("/dev/termination-log")
}

/// The host file behind a container's termination message.
fn termination_file(pod_dir: &Path, c: &Container) -> PathBuf {
    pod_dir.join(format!("{}.termination-log", c.name))
}

async fn resolve_local(
    shared: &Host,
    pod: &Pod,
    c: &Container,
    entrypoint: &[String],
    pod_map: &PathMap,
    pod_dir: &Path,
) -> Result<LocalRun, String> {
    let ns = namespace(pod);
    let mut map = pod_map.clone();
    let termination_file = termination_file(pod_dir, c);
    tokio::fs::write(&termination_file, b"")
        .await
        .map_err(io_err("write", &termination_file))?;
    map.add(termination_message_path(c), &termination_file);

    let mut vars: HashMap<String, String> = HashMap::new();
    let mut order: Vec<String> = Vec::new();
    let mut set = |vars: &mut HashMap<String, String>, k: String, v: String| {
        if !vars.contains_key(&k) {
            order.push(k.clone());
        }
        vars.insert(k, v);
    };
    for from in c.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let data = if let Some(r) = &from.secret_ref {
            match get_secret(shared, &ns, &r.name).await? {
                Some(s) => secret_data(&s),
                None if r.optional == Some(true) => Vec::new(),
                None => return Err(format!("secret \"{}\" not found", r.name)),
            }
        } else if let Some(r) = &from.config_map_ref {
            match get_config_map(shared, &ns, &r.name).await? {
                Some(cm) => config_map_data(&cm),
                None if r.optional == Some(true) => Vec::new(),
                None => return Err(format!("configmap \"{}\" not found", r.name)),
            }
        } else {
            Vec::new()
        };
        for (k, v) in data {
            set(
                &mut vars,
                format!("{prefix}{k}"),
                String::from_utf8_lossy(&v).into_owned(),
            );
        }
    }
    for e in c.env.iter().flatten() {
        let value = if let Some(v) = &e.value {
            expand(v, &vars)
        } else if let Some(from) = &e.value_from {
            if let Some(r) = &from.secret_key_ref {
                let secret = get_secret(shared, &ns, &r.name).await?;
                let value = secret
                    .as_ref()
                    .and_then(|s| secret_data(s).into_iter().find(|(k, _)| *k == r.key))
                    .map(|(_, v)| String::from_utf8_lossy(&v).into_owned());
                match (value, r.optional == Some(true), secret.is_some()) {
                    (Some(v), _, _) => v,
                    (None, true, _) => continue,
                    (None, false, false) => return Err(format!("secret \"{}\" not found", r.name)),
                    (None, false, true) => {
                        return Err(format!(
                            "couldn't find key {} in Secret {ns}/{}",
                            r.key, r.name
                        ));
                    }
                }
            } else if let Some(r) = &from.config_map_key_ref {
                let cm = get_config_map(shared, &ns, &r.name).await?;
                let value = cm
                    .as_ref()
                    .and_then(|c| config_map_data(c).into_iter().find(|(k, _)| *k == r.key))
                    .map(|(_, v)| String::from_utf8_lossy(&v).into_owned());
                match (value, r.optional == Some(true), cm.is_some()) {
                    (Some(v), _, _) => v,
                    (None, true, _) => continue,
                    (None, false, false) => {
                        return Err(format!("configmap \"{}\" not found", r.name));
                    }
                    (None, false, true) => {
                        return Err(format!(
                            "couldn't find key {} in ConfigMap {ns}/{}",
                            r.key, r.name
                        ));
                    }
                }
            } else if let Some(f) = &from.field_ref {
                field_value(pod, &f.field_path)
            } else {
                String::new()
            }
        } else {
            String::new()
        };
        set(&mut vars, e.name.clone(), value);
    }
    let argv: Vec<String> = kubelet::local_argv(entrypoint, c)
        .iter()
        .map(|a| map.rewrite(&expand(a, &vars)))
        .collect();
    if argv.is_empty() {
        return Err(format!("container {}: no command to run", c.name));
    }
    let mut env: Vec<(String, String)> = vec![
        (
            "PATH".into(),
            std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into()),
        ),
        ("HOME".into(), pod_dir.join("home").display().to_string()),
        (
            "HOSTNAME".into(),
            pod.metadata.name.clone().unwrap_or_default(),
        ),
    ];
    env.extend(
        order
            .iter()
            .filter_map(|k| vars.get(k).map(|v| (k.clone(), map.rewrite(v)))),
    );
    let cwd = c
        .working_dir
        .as_deref()
        .and_then(|w| map.host_path(w))
        .unwrap_or_else(|| pod_dir.to_path_buf());
    Ok(LocalRun {
        argv,
        env,
        cwd,
        termination_file,
    })
}

fn field_value(pod: &Pod, path: &str) -> String {
    let m = &pod.metadata;
    match path {
        "metadata.name" => m.name.clone().unwrap_or_default(),
        "metadata.namespace" => namespace(pod),
        "metadata.uid" => m.uid.clone().unwrap_or_default(),
        "spec.nodeName" => pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default(),
        "spec.serviceAccountName" => pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        "status.podIP" | "status.hostIP" => "127.0.0.1".into(),
        other => {
            let label = |prefix: &str, map: &Option<std::collections::BTreeMap<String, String>>| {
                other
                    .strip_prefix(prefix)
                    .and_then(|r| r.strip_prefix("['"))
                    .and_then(|r| r.strip_suffix("']"))
                    .and_then(|k| map.as_ref()?.get(k).cloned())
            };
            label("metadata.labels", &m.labels)
                .or_else(|| label("metadata.annotations", &m.annotations))
                .unwrap_or_default()
        }
    }
}

fn terminated(
    pod: &Pod,
    c: &Container,
    exit_code: i32,
    message: Option<String>,
    started_at: Time,
) -> Ended {
    let reason = if exit_code == 0 { "Completed" } else { "Error" };
    let state = ContainerState {
        terminated: Some(ContainerStateTerminated {
            exit_code,
            reason: Some(reason.into()),
            message: message.filter(|m| !m.is_empty()),
            started_at: Some(started_at),
            finished_at: Some(now()),
            container_id: Some(format!(
                "kube-sim://{}-{}",
                pod.metadata.uid.as_deref().unwrap_or(""),
                c.name
            )),
            signal: None,
        }),
        ..ContainerState::default()
    };
    Ended {
        status: container_status(pod, c, state, false),
        exit_code,
    }
}

async fn run_script(
    shared: &Host,
    pod: &Pod,
    c: &Container,
    script: &Script,
    mut stop: watch::Receiver<Option<Stop>>,
) -> Ended {
    let started = now();
    let start = tokio::time::Instant::now();
    let ns = namespace(pod);
    let name = pod.metadata.name.clone().unwrap_or_default();
    let (lines, message) = kubelet::script_output(script);
    let log = |line: &str| {
        shared
            .logs
            .append(&ns, &name, &c.name, format!("{line}\n").as_bytes())
    };
    let mut lines = lines.into_iter().peekable();
    let end = script.duration.map(|d| start + d);
    loop {
        let next_line = lines.peek().map(|(at, _)| start + *at);
        let wake_at = match (next_line, end) {
            (Some(l), Some(e)) => Some(l.min(e)),
            (l, e) => l.or(e),
        };
        let stopped = tokio::select! {
            _ = async {
                match wake_at {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            } => None,
            s = wait_stop(&mut stop) => Some(s),
        };
        if let Some(stop) = stopped {
            // A scripted container dies on SIGTERM at once: 143, or 137 when killed.
            let code = if matches!(stop, Some(Stop::Kill)) {
                137
            } else {
                143
            };
            return terminated(pod, c, code, None, started);
        }
        let now_i = tokio::time::Instant::now();
        while lines.peek().is_some_and(|(at, _)| start + *at <= now_i) {
            if let Some((_, line)) = lines.next() {
                log(&line);
            }
        }
        if end.is_some_and(|e| e <= now_i) {
            for (_, line) in lines {
                log(&line);
            }
            return terminated(pod, c, script.exit_code, message, started);
        }
    }
}

/// Sends a signal to a process group; a group already gone is fine.
fn signal_group(pgid: u32, signal: Signal) {
    if let Ok(pid) = i32::try_from(pgid) {
        let _ = killpg(Pid::from_raw(pid), signal);
    }
}

/// Kills a process group at once (cluster teardown).
pub(super) fn kill_group_now(pgid: u32) {
    signal_group(pgid, Signal::SIGKILL);
}

async fn run_local(
    shared: &Host,
    pod: &Pod,
    c: &Container,
    run: LocalRun,
    mut stop: watch::Receiver<Option<Stop>>,
) -> Ended {
    let started = now();
    let ns = namespace(pod);
    let name = pod.metadata.name.clone().unwrap_or_default();
    let mut cmd = tokio::process::Command::new(&run.argv[0]);
    cmd.args(&run.argv[1..])
        .env_clear()
        .envs(run.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&run.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so that termination reaches the children of a shell too.
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            let message = format!("failed to start {}: {e}", run.argv[0]);
            shared
                .logs
                .append(&ns, &name, &c.name, format!("{message}\n").as_bytes());
            let mut ended = terminated(pod, c, 128, Some(message), started);
            if let Some(t) = ended
                .status
                .state
                .as_mut()
                .and_then(|s| s.terminated.as_mut())
            {
                t.reason = Some("StartError".into());
            }
            return ended;
        }
    };
    let pgid = child.id().unwrap_or(0);
    shared
        .process_groups
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(pgid, name.clone());
    let pump = |stream: Option<Box<dyn tokio::io::AsyncRead + Unpin + Send>>| {
        let logs = shared.logs.clone();
        let (ns, name, container) = (ns.clone(), name.clone(), c.name.clone());
        tokio::spawn(async move {
            let Some(mut stream) = stream else { return };
            let mut buf = vec![0u8; 8192];
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                logs.append(&ns, &name, &container, &buf[..n]);
            }
        })
    };
    let out = pump(child.stdout.take().map(|s| Box::new(s) as _));
    let err = pump(child.stderr.take().map(|s| Box::new(s) as _));
    let status = tokio::select! {
        status = child.wait() => status,
        how = wait_stop(&mut stop) => {
            let grace = match how {
                Some(Stop::Delete(g)) => g,
                Some(Stop::Shutdown(cap)) => grace_period(pod).min(cap),
                _ => Duration::ZERO,
            };
            if !grace.is_zero() {
                signal_group(pgid, Signal::SIGTERM);
            }
            match tokio::time::timeout(grace, child.wait()).await {
                Ok(status) => status,
                Err(_) => {
                    signal_group(pgid, Signal::SIGKILL);
                    child.wait().await
                }
            }
        }
    };
    // Whatever the shell left behind goes with it.
    signal_group(pgid, Signal::SIGKILL);
    let _ = out.await;
    let _ = err.await;
    shared
        .process_groups
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .remove(&pgid);
    let exit_code = match status {
        Ok(s) => {
            use std::os::unix::process::ExitStatusExt;
            s.code()
                .or_else(|| s.signal().map(|sig| 128 + sig))
                .unwrap_or(1)
        }
        Err(_) => 1,
    };
    let mut message = tokio::fs::read(&run.termination_file)
        .await
        .map(|mut b| {
            b.truncate(MAX_TERMINATION_MESSAGE);
            String::from_utf8_lossy(&b).into_owned()
        })
        .unwrap_or_default();
    if message.is_empty()
        && exit_code != 0
        && c.termination_message_policy.as_deref() == Some("FallbackToLogsOnError")
    {
        let log = shared
            .logs
            .read(&ns, &name, Some(&c.name))
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&log);
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(80)..].join("\n");
        let mut cut = tail.len().saturating_sub(2048);
        while !tail.is_char_boundary(cut) {
            cut += 1;
        }
        message = tail[cut..].to_string();
    }
    terminated(pod, c, exit_code, Some(message), started)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_references_expand_like_kubernetes() {
        let vars = HashMap::from([("A".to_string(), "1".to_string())]);
        assert_eq!(expand("x$(A)y", &vars), "x1y");
        assert_eq!(expand("$$(A) $(B) $", &vars), "$(A) $(B) $");
    }

    #[test]
    fn conditions_keep_transition_time_when_status_is_unchanged() {
        let mut pod = Pod::default();
        let old = PodCondition {
            type_: "Ready".into(),
            status: "False".into(),
            last_transition_time: Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)),
            ..PodCondition::default()
        };
        pod.status = Some(k8s_openapi::api::core::v1::PodStatus {
            conditions: Some(vec![old.clone()]),
            ..Default::default()
        });
        let merged = merge_conditions(
            &pod,
            vec![
                condition("Ready", false, Some("X"), None),
                condition("DisruptionTarget", true, None, None),
            ],
        );
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[0].last_transition_time, old.last_transition_time);
        assert_eq!(merged[0].reason.as_deref(), Some("X"));
        let merged = merge_conditions(&pod, vec![condition("Ready", true, None, None)]);
        assert_ne!(merged[0].last_transition_time, old.last_transition_time);
    }

    #[test]
    fn field_refs() {
        let pod: Pod = serde_yaml::from_str(
            "metadata: {name: p, namespace: n, labels: {app: x}}\nspec: {nodeName: n1, containers: []}",
        )
        .unwrap();
        assert_eq!(field_value(&pod, "metadata.name"), "p");
        assert_eq!(field_value(&pod, "spec.nodeName"), "n1");
        assert_eq!(field_value(&pod, "metadata.labels['app']"), "x");
    }
}
