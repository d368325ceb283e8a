//! The verbs on stored objects (create, update, patch, delete, list) with the apiserver's
//! admission rules: metadata management, optimistic concurrency, status subresource,
//! generation, pod immutability, CRD schema admission, finalizers and deletion.
//!
//! Everything here runs under the store lock, synchronously, so every verb is atomic.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde_json::{Map, Value, json};
use tokio::sync::Notify;

use super::meta::{self, ApiError};
use super::patch::{self, PatchKind};
use super::resources::{self, ResourceType};
use super::selectors::{FieldSelector, LabelSelector};
use super::store::{ObjectKey, Store, name_of, namespace_of, resource_key, rv_of};
use crate::schema::FieldError;

/// Finalizer that holds a PVC while a pod uses it.
pub const PVC_PROTECTION: &str = "kubernetes.io/pvc-protection";
/// Finalizer of foreground deletion.
pub const FOREGROUND: &str = "foregroundDeletion";
/// Finalizer of orphan deletion.
pub const ORPHAN: &str = "orphan";

/// The apiserver state shared by the HTTP handlers and the garbage collector.
#[derive(Debug)]
pub struct ApiState {
    store: Mutex<Store>,
    /// Wakes the garbage collector.
    pub gc: Notify,
    /// Bumped by a simulated apiserver restart; open watches end when it changes.
    pub restarts: tokio::sync::watch::Sender<u64>,
}

/// Options of a delete.
#[derive(Debug, Clone, Default)]
pub struct DeleteOpts {
    /// `Foreground`, `Background` or `Orphan`.
    pub propagation: Option<String>,
    /// `preconditions.resourceVersion`.
    pub precondition_rv: Option<String>,
    /// `preconditions.uid`.
    pub precondition_uid: Option<String>,
    /// `gracePeriodSeconds` (pods only).
    pub grace_period: Option<i64>,
}

/// Which part of an object a write addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The main resource.
    Main,
    /// The `/status` subresource.
    Status,
}

/// One page of a list: the items, the list's resourceVersion and the continue token.
pub type ListPage = (Vec<Arc<Value>>, u64, Option<String>);

/// Options of a list.
#[derive(Debug, Clone, Default)]
pub struct ListOpts {
    /// Label selector.
    pub labels: LabelSelector,
    /// Field selector.
    pub fields: FieldSelector,
    /// Page size.
    pub limit: Option<usize>,
    /// Continue token from a previous page.
    pub continue_token: Option<String>,
}

fn meta_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    match obj.get_mut("metadata") {
        Some(Value::Object(m)) => m,
        // Just made sure it is an object.
        _ => unreachable!("metadata is an object"),
    }
}

fn finalizers(obj: &Value) -> Vec<String> {
    obj.pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

fn set_finalizers(obj: &mut Value, list: &[String]) {
    let m = meta_mut(obj);
    if list.is_empty() {
        m.remove("finalizers");
    } else {
        m.insert("finalizers".into(), json!(list));
    }
}

fn is_deleting(obj: &Value) -> bool {
    obj.pointer("/metadata/deletionTimestamp")
        .is_some_and(|v| !v.is_null())
}

/// Everything except `metadata` (and `status` when it is a subresource): what bumps
/// `metadata.generation` when it changes.
/// Whether `old` and `new` differ outside metadata, apiVersion, kind (and status, when it is a
/// subresource): what bumps `metadata.generation`. Compared in place, since cloning whole
/// objects to strip those fields was a visible share of every write.
fn generation_changed(old: &Value, new: &Value, status_sub: bool) -> bool {
    let relevant = |k: &String| {
        let ignored = match k.as_str() {
            "metadata" | "apiVersion" | "kind" => true,
            "status" => status_sub,
            _ => false,
        };
        !ignored
    };
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            a.keys().filter(|k| relevant(k)).count() != b.keys().filter(|k| relevant(k)).count()
                || a.iter()
                    .filter(|(k, _)| relevant(k))
                    .any(|(k, v)| b.get(k) != Some(v))
        }
        _ => old != new,
    }
}

fn field_causes(errors: Vec<FieldError>) -> Vec<(String, &'static str, String)> {
    errors
        .into_iter()
        .map(|e| {
            let full = e.to_string();
            let body = full
                .strip_prefix(&format!("{}: ", e.path))
                .unwrap_or(&full)
                .to_string();
            (e.path.clone(), e.error_type.reason(), body)
        })
        .collect()
}

fn invalid(
    rt: &ResourceType,
    name: &str,
    field: &str,
    reason: &'static str,
    msg: &str,
) -> ApiError {
    ApiError::invalid(
        &rt.kind,
        &rt.group,
        name,
        vec![(field.to_string(), reason, msg.to_string())],
    )
}

/// Pod spec fields an update may change (besides setting `nodeName` once, which the
/// emulator allows for schedulers that patch instead of binding).
fn pod_spec_update_allowed(old: &Value, new: &Value) -> bool {
    let mut a = old.get("spec").cloned().unwrap_or(Value::Null);
    let mut b = new.get("spec").cloned().unwrap_or(Value::Null);
    for spec in [&mut a, &mut b] {
        if let Value::Object(m) = spec {
            for field in [
                "activeDeadlineSeconds",
                "tolerations",
                "terminationGracePeriodSeconds",
                "schedulingGates",
            ] {
                m.remove(field);
            }
            for list in ["containers", "initContainers"] {
                if let Some(Value::Array(cs)) = m.get_mut(list) {
                    for c in cs {
                        if let Value::Object(c) = c {
                            c.remove("image");
                        }
                    }
                }
            }
        }
    }
    let old_node = old
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .unwrap_or("");
    if old_node.is_empty() {
        for spec in [&mut a, &mut b] {
            if let Value::Object(m) = spec {
                m.remove("nodeName");
            }
        }
    }
    a == b
}

impl ApiState {
    /// A state serving the built-in types.
    pub fn new(history_cap: usize) -> ApiState {
        let mut store = Store::new(resources::builtins(), history_cap);
        for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            let mut obj = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}, "spec": {}});
            prepare_new(&mut obj, "namespaces");
            store.put("/namespaces", obj);
        }
        ApiState {
            store: Mutex::new(store),
            gc: Notify::new(),
            restarts: tokio::sync::watch::Sender::new(0),
        }
    }

    /// Simulates an apiserver restart: the watch history is forgotten (resuming from an
    /// older resourceVersion gets `410 Gone`) and every open watch ends.
    pub fn restart(&self) {
        let mut store = self.lock();
        store.expire_history();
        let epoch = store.epoch;
        drop(store);
        self.restarts.send_replace(epoch);
    }

    /// Locks the store.
    pub fn lock(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The type served at a group/version/plural (or short name / kind, for convenience).
    pub fn resolve(&self, group: &str, version: &str, plural: &str) -> Option<ResourceType> {
        self.lock()
            .types
            .iter()
            .find(|t| t.group == group && t.version == version && t.plural == plural)
            .cloned()
    }

    /// A snapshot of the served types.
    pub fn types(&self) -> Vec<ResourceType> {
        self.lock().types.clone()
    }

    /// GET one object.
    pub fn get(&self, rt: &ResourceType, ns: &str, name: &str) -> Result<Arc<Value>, ApiError> {
        self.lock()
            .get(&resource_key(&rt.group, &rt.plural), ns, name)
            .ok_or_else(|| ApiError::not_found(&rt.group, &rt.plural, name))
    }

    /// LIST, returning the items of this page, the list resourceVersion and the continue token.
    pub fn list(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        opts: &ListOpts,
    ) -> Result<ListPage, ApiError> {
        let store = self.lock();
        let key = resource_key(&rt.group, &rt.plural);
        let after = match &opts.continue_token {
            Some(tok) => Some(decode_continue(tok)?),
            None => None,
        };
        let matches = |o: &&Arc<Value>| {
            ns.is_none_or(|ns| namespace_of(o) == ns)
                && opts.labels.matches(o)
                && opts.fields.matches(o)
        };
        let mut items = Vec::new();
        let mut next = None;
        if let (Some(name), None) = (opts.fields.pinned_name(), &after) {
            let found: Vec<Arc<Value>> = match ns {
                Some(ns) => store.get(&key, ns, name).into_iter().collect(),
                None => store
                    .list(&key, None)
                    .filter(|o| name_of(o) == name)
                    .cloned()
                    .collect(),
            };
            items.extend(found.iter().filter(|o| matches(o)).cloned());
            return Ok((items, store.rv(), None));
        }
        let iter: Box<dyn Iterator<Item = &Arc<Value>>> = match after {
            Some(after) => store.list_after(&key, after),
            None => store.list(&key, ns),
        };
        for obj in iter.filter(matches) {
            if opts.limit.is_some_and(|l| l > 0 && items.len() >= l) {
                if let Some(last) = items.last() {
                    next = Some(encode_continue(namespace_of(last), name_of(last)));
                }
                break;
            }
            items.push(obj.clone());
        }
        Ok((items, store.rv(), next))
    }

    /// CREATE.
    pub fn create(&self, rt: &ResourceType, ns: &str, body: Value) -> Result<Arc<Value>, ApiError> {
        let mut store = self.lock();
        let created = create_locked(&mut store, rt, ns, body);
        self.wake_gc(store);
        created
    }

    /// UPDATE (PUT) of the main resource or `/status`.
    pub fn update(
        &self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        body: Value,
        part: Part,
    ) -> Result<Arc<Value>, ApiError> {
        let mut store = self.lock();
        let key = resource_key(&rt.group, &rt.plural);
        let old = store
            .get(&key, ns, name)
            .ok_or_else(|| ApiError::not_found(&rt.group, &rt.plural, name))?;
        if name_of(&body) != name && !name_of(&body).is_empty() {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({}) does not match the name on the URL ({name})",
                name_of(&body)
            )));
        }
        let out = update_locked(&mut store, rt, &old, body, part);
        self.wake_gc(store);
        out
    }

    /// PATCH of the main resource or `/status`. Server-side apply creates missing objects.
    pub fn patch(
        &self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        kind: PatchKind,
        body: &Value,
        part: Part,
    ) -> Result<Arc<Value>, ApiError> {
        let mut store = self.lock();
        let key = resource_key(&rt.group, &rt.plural);
        let Some(old) = store.get(&key, ns, name) else {
            if kind == PatchKind::Apply && part == Part::Main {
                let mut obj = body.clone();
                meta_mut(&mut obj).insert("name".into(), json!(name));
                let created = create_locked(&mut store, rt, ns, obj);
                self.wake_gc(store);
                return created;
            }
            return Err(ApiError::not_found(&rt.group, &rt.plural, name));
        };
        let mut target = (*old).clone();
        match kind {
            PatchKind::Merge => patch::merge_patch(&mut target, body),
            PatchKind::Strategic | PatchKind::Apply => {
                if rt.custom && kind == PatchKind::Strategic {
                    return Err(ApiError::new(
                        415,
                        "UnsupportedMediaType",
                        "strategic merge patch is not supported for custom resources",
                    ));
                }
                let mut body = body.clone();
                // Applying to /status only looks at the applied status.
                if kind == PatchKind::Apply
                    && part == Part::Status
                    && let Some(status) = body.get("status").cloned()
                {
                    body = json!({"status": status});
                }
                patch::strategic_merge(&mut target, &body);
            }
            PatchKind::Json => patch::json_patch(&mut target, body)
                .map_err(|e| ApiError::new(422, "Invalid", e.to_string()))?,
        }
        let out = update_locked(&mut store, rt, &old, target, part);
        self.wake_gc(store);
        out
    }

    /// DELETE. Returns the object as last stored (with `deletionTimestamp` when finalizers hold
    /// it) and whether it is gone.
    pub fn delete(
        &self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        opts: &DeleteOpts,
    ) -> Result<(Arc<Value>, bool), ApiError> {
        let mut store = self.lock();
        let out = delete_locked(&mut store, rt, ns, name, opts);
        self.wake_gc(store);
        out
    }

    /// Releases the store and wakes the GC when the write left it work (the store queues
    /// only changes that can alter a collection decision, so status churn costs nothing).
    fn wake_gc(&self, store: MutexGuard<'_, Store>) {
        let pending = store.gc_pending();
        drop(store);
        if pending {
            self.gc.notify_one();
        }
    }

    /// `pods/{name}/binding`: sets `spec.nodeName` once.
    pub fn bind(
        &self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        node: &str,
    ) -> Result<(), ApiError> {
        let mut store = self.lock();
        let key = resource_key(&rt.group, &rt.plural);
        let old = store
            .get(&key, ns, name)
            .ok_or_else(|| ApiError::not_found(&rt.group, &rt.plural, name))?;
        let bound = old
            .pointer("/spec/nodeName")
            .and_then(Value::as_str)
            .unwrap_or("");
        if !bound.is_empty() {
            return Err(ApiError::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on pods/binding \"{name}\": pod {name} is already assigned to node \"{bound}\""
                ),
            ));
        }
        let mut new = (*old).clone();
        new["spec"]["nodeName"] = json!(node);
        let cond = json!({"type": "PodScheduled", "status": "True", "lastTransitionTime": meta::now_rfc3339()});
        patch::strategic_merge(&mut new, &json!({"status": {"conditions": [cond]}}));
        store.put(&key, new);
        Ok(())
    }

    /// Garbage-collection passes over the changes since the last call until nothing changes:
    /// ownerReference cascades, foreground and orphan finalizers, pvc-protection and namespace
    /// termination.
    pub fn collect_garbage(&self) {
        let mut store = self.lock();
        for _ in 0..16 {
            if !gc_pass(&mut store) {
                break;
            }
        }
        if store.gc_pending() {
            // A long cascade continues on the next wake-up, so writes get the lock between.
            self.gc.notify_one();
        }
    }
}

fn encode_continue(ns: &str, name: &str) -> String {
    format!("{ns}/{name}")
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn decode_continue(token: &str) -> Result<(String, String), ApiError> {
    let bad = || ApiError::bad_request(format!("continue key is not valid: {token}"));
    if !token.len().is_multiple_of(2) {
        return Err(bad());
    }
    let bytes: Result<Vec<u8>, _> = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&token[i..i + 2], 16))
        .collect();
    let text = String::from_utf8(bytes.map_err(|_| bad())?).map_err(|_| bad())?;
    let (ns, name) = text.split_once('/').ok_or_else(bad)?;
    Ok((ns.to_string(), name.to_string()))
}

/// Server-owned metadata and type-specific defaults of a new object.
fn prepare_new(obj: &mut Value, plural: &str) {
    let m = meta_mut(obj);
    m.insert("uid".into(), json!(meta::new_uid()));
    m.insert("creationTimestamp".into(), json!(meta::now_rfc3339()));
    m.insert("generation".into(), json!(1));
    m.remove("deletionTimestamp");
    m.remove("deletionGracePeriodSeconds");
    m.remove("resourceVersion");
    m.remove("selfLink");
    match plural {
        "namespaces" => {
            obj["spec"] = json!({"finalizers": ["kubernetes"]});
            obj["status"] = json!({"phase": "Active"});
        }
        "pods" => {
            let qos = if obj.pointer("/spec/containers").is_some_and(|c| {
                c.as_array().is_some_and(|cs| {
                    cs.iter().any(|c| {
                        c.get("resources").is_some_and(|r| {
                            r.get("limits").is_some() || r.get("requests").is_some()
                        })
                    })
                })
            }) {
                "Burstable"
            } else {
                "BestEffort"
            };
            obj["status"] = json!({"phase": "Pending", "qosClass": qos});
            if let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) {
                spec.entry("restartPolicy").or_insert(json!("Always"));
                spec.entry("schedulerName")
                    .or_insert(json!("default-scheduler"));
                spec.entry("terminationGracePeriodSeconds")
                    .or_insert(json!(30));
            }
        }
        "persistentvolumeclaims" => {
            let mut f = finalizers(obj);
            if !f.iter().any(|x| x == PVC_PROTECTION) {
                f.push(PVC_PROTECTION.to_string());
            }
            set_finalizers(obj, &f);
            obj["status"] = json!({"phase": "Pending"});
        }
        _ => {}
    }
}

fn create_locked(
    store: &mut Store,
    rt: &ResourceType,
    ns: &str,
    mut obj: Value,
) -> Result<Arc<Value>, ApiError> {
    if !obj.is_object() {
        return Err(ApiError::bad_request(
            "the body of the request is not a JSON object",
        ));
    }
    obj["apiVersion"] = json!(rt.api_version());
    obj["kind"] = json!(rt.kind);
    let key = resource_key(&rt.group, &rt.plural);
    {
        let m = meta_mut(&mut obj);
        if rt.namespaced {
            let body_ns = m.get("namespace").and_then(Value::as_str).unwrap_or("");
            if !body_ns.is_empty() && body_ns != ns {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            m.insert("namespace".into(), json!(ns));
        } else {
            m.remove("namespace");
        }
        let name = m
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if name.is_empty() {
            match m.get("generateName").and_then(Value::as_str) {
                Some(prefix) if !prefix.is_empty() => {
                    let generated = format!("{prefix}{}", meta::name_suffix());
                    m.insert("name".into(), json!(generated));
                }
                _ => {
                    return Err(invalid(
                        rt,
                        "",
                        "metadata.name",
                        "FieldValueRequired",
                        "Required value: name or generateName is required",
                    ));
                }
            }
        }
    }
    let name = name_of(&obj).to_string();
    let bad_name = if rt.plural == "namespaces" {
        meta::validate_label(&name)
    } else {
        meta::validate_subdomain(&name)
    };
    if let Some(msg) = bad_name {
        return Err(invalid(
            rt,
            &name,
            "metadata.name",
            "FieldValueInvalid",
            &format!("Invalid value: \"{name}\": {msg}"),
        ));
    }
    if rt.namespaced {
        match store.get("/namespaces", "", ns) {
            None => return Err(ApiError::not_found("", "namespaces", ns)),
            Some(n) if is_deleting(&n) => {
                return Err(ApiError::new(
                    403,
                    "Forbidden",
                    format!(
                        "{} \"{name}\" is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                        rt.plural
                    ),
                ));
            }
            Some(_) => {}
        }
    }
    if store.get(&key, ns, &name).is_some() {
        return Err(ApiError::already_exists(&rt.group, &rt.plural, &name));
    }
    prepare_new(&mut obj, if rt.group.is_empty() { &rt.plural } else { "" });
    if rt.custom
        && rt.status_subresource
        && let Value::Object(m) = &mut obj
    {
        m.remove("status");
    }
    if let Some(schema) = &rt.schema {
        obj = schema
            .admit(obj, None)
            .map_err(|errs| ApiError::invalid(&rt.kind, &rt.group, &name, field_causes(errs)))?;
    }
    if rt.plural == "customresourcedefinitions" {
        install_crd(store, &mut obj)
            .map_err(|msg| invalid(rt, &name, "spec", "FieldValueInvalid", &msg))?;
    }
    Ok(store.put(&key, obj))
}

/// Registers the types a CRD defines and marks it Established.
fn install_crd(store: &mut Store, crd: &mut Value) -> Result<(), String> {
    let types = resources::from_crd(crd)?;
    let Some(first) = types.first() else {
        return Err("no served versions".to_string());
    };
    let (group, plural) = (first.group.clone(), first.plural.clone());
    store
        .types
        .retain(|t| !(t.custom && t.group == group && t.plural == plural));
    store.types.extend(types);
    let now = meta::now_rfc3339();
    crd["status"] = json!({
        "acceptedNames": crd.pointer("/spec/names").cloned().unwrap_or(Value::Null),
        "storedVersions": crd.pointer("/spec/versions").and_then(Value::as_array).map(|vs| vs.iter().filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true)).filter_map(|v| v.get("name").cloned()).collect::<Vec<_>>()),
        "conditions": [
            {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found", "lastTransitionTime": now},
            {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted", "lastTransitionTime": now},
        ],
    });
    Ok(())
}

fn update_locked(
    store: &mut Store,
    rt: &ResourceType,
    old: &Arc<Value>,
    mut new: Value,
    part: Part,
) -> Result<Arc<Value>, ApiError> {
    let key = resource_key(&rt.group, &rt.plural);
    let name = name_of(old).to_string();
    if !new.is_object() {
        return Err(ApiError::bad_request(
            "the body of the request is not a JSON object",
        ));
    }
    if let Some(rv) = new
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        && !rv.is_empty()
        && Some(rv)
            != old
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
    {
        return Err(ApiError::conflict(&rt.group, &rt.plural, &name));
    }
    new["apiVersion"] = json!(rt.api_version());
    new["kind"] = json!(rt.kind);
    if part == Part::Status {
        let status = new.get("status").cloned();
        new = (**old).clone();
        match status {
            Some(s) => new["status"] = s,
            None => {
                if let Value::Object(m) = &mut new {
                    m.remove("status");
                }
            }
        }
    } else if rt.status_subresource {
        match old.get("status") {
            Some(s) => new["status"] = s.clone(),
            None => {
                if let Value::Object(m) = &mut new {
                    m.remove("status");
                }
            }
        }
    }
    // Server-owned metadata cannot be changed by clients.
    {
        let old_meta = old.get("metadata").cloned().unwrap_or(json!({}));
        let m = meta_mut(&mut new);
        for field in [
            "uid",
            "creationTimestamp",
            "name",
            "namespace",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
        ] {
            match old_meta.get(field) {
                Some(v) => {
                    m.insert(field.into(), v.clone());
                }
                None => {
                    m.remove(field);
                }
            }
        }
        m.insert(
            "resourceVersion".into(),
            old_meta
                .get("resourceVersion")
                .cloned()
                .unwrap_or(Value::Null),
        );
    }
    if rt.plural == "namespaces" && rt.group.is_empty() {
        new["spec"] = old.get("spec").cloned().unwrap_or(json!({}));
    }
    if part == Part::Main
        && rt.plural == "pods"
        && rt.group.is_empty()
        && !pod_spec_update_allowed(old, &new)
    {
        return Err(invalid(
            rt,
            &name,
            "spec",
            "FieldValueForbidden",
            "Forbidden: pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)",
        ));
    }
    if is_deleting(old) {
        let old_f = finalizers(old);
        if finalizers(&new).iter().any(|f| !old_f.contains(f)) {
            return Err(invalid(
                rt,
                &name,
                "metadata.finalizers",
                "FieldValueForbidden",
                "Forbidden: no new finalizers can be added if the object is being deleted",
            ));
        }
    }
    if let Some(schema) = &rt.schema {
        new = schema
            .admit(new, Some(old))
            .map_err(|errs| ApiError::invalid(&rt.kind, &rt.group, &name, field_causes(errs)))?;
    }
    if rt.plural == "customresourcedefinitions" && part == Part::Main {
        install_crd(store, &mut new)
            .map_err(|msg| invalid(rt, &name, "spec", "FieldValueInvalid", &msg))?;
    }
    if generation_changed(old, &new, rt.status_subresource) {
        let g = old
            .pointer("/metadata/generation")
            .and_then(Value::as_i64)
            .unwrap_or(1);
        meta_mut(&mut new).insert("generation".into(), json!(g + 1));
    }
    // A terminating pod still within its grace period waits for the kubelet's final delete.
    let grace_left = new
        .pointer("/metadata/deletionGracePeriodSeconds")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    if is_deleting(&new) && finalizers(&new).is_empty() && grace_left == 0 {
        return store
            .remove(&key, namespace_of(old), &name)
            .ok_or_else(|| ApiError::not_found(&rt.group, &rt.plural, &name));
    }
    if new == **old {
        return Ok(old.clone());
    }
    Ok(store.put(&key, new))
}

fn delete_locked(
    store: &mut Store,
    rt: &ResourceType,
    ns: &str,
    name: &str,
    opts: &DeleteOpts,
) -> Result<(Arc<Value>, bool), ApiError> {
    let key = resource_key(&rt.group, &rt.plural);
    let old = store
        .get(&key, ns, name)
        .ok_or_else(|| ApiError::not_found(&rt.group, &rt.plural, name))?;
    let uid = old
        .pointer("/metadata/uid")
        .and_then(Value::as_str)
        .unwrap_or("");
    if opts
        .precondition_uid
        .as_deref()
        .is_some_and(|want| want != uid)
    {
        return Err(ApiError::new(
            409,
            "Conflict",
            format!(
                "Precondition failed: UID in precondition: {}, UID in object meta: {uid}",
                opts.precondition_uid.as_deref().unwrap_or("")
            ),
        ));
    }
    if let Some(want) = &opts.precondition_rv
        && Some(want.as_str())
            != old
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
    {
        return Err(ApiError::new(
            409,
            "Conflict",
            format!(
                "Precondition failed: ResourceVersion in precondition: {want}, ResourceVersion in object meta: {}",
                rv_of(&old).unwrap_or(0)
            ),
        ));
    }
    let mut f = finalizers(&old);
    match opts.propagation.as_deref() {
        Some("Foreground") if !f.iter().any(|x| x == FOREGROUND) => f.push(FOREGROUND.to_string()),
        Some("Orphan") if !f.iter().any(|x| x == ORPHAN) => f.push(ORPHAN.to_string()),
        _ => {}
    }
    let namespace_type = rt.plural == "namespaces" && rt.group.is_empty();
    // A pod on a node terminates gracefully: the kubelet stops it and then deletes it with
    // grace 0. Unscheduled and finished pods go at once, as in kube-apiserver.
    let pod = rt.plural == "pods" && rt.group.is_empty();
    let bound = !old
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .unwrap_or("")
        .is_empty();
    let finished = matches!(
        old.pointer("/status/phase").and_then(Value::as_str),
        Some("Succeeded" | "Failed")
    );
    let grace = opts
        .grace_period
        .or_else(|| {
            old.pointer("/metadata/deletionGracePeriodSeconds")
                .and_then(Value::as_i64)
        })
        .or_else(|| {
            old.pointer("/spec/terminationGracePeriodSeconds")
                .and_then(Value::as_i64)
        })
        .unwrap_or(30);
    let graceful = pod && bound && !finished && grace > 0;
    if f.is_empty() && !namespace_type && !graceful {
        let last = store
            .remove(&key, ns, name)
            .ok_or_else(|| ApiError::not_found(&rt.group, &rt.plural, name))?;
        return Ok((last, true));
    }
    let new_grace = if graceful { grace } else { 0 };
    let old_grace = old
        .pointer("/metadata/deletionGracePeriodSeconds")
        .and_then(Value::as_i64);
    if is_deleting(&old) && f == finalizers(&old) && old_grace.is_some_and(|g| g <= new_grace) {
        return Ok((old, false));
    }
    let mut new = (*old).clone();
    set_finalizers(&mut new, &f);
    let m = meta_mut(&mut new);
    if !m.contains_key("deletionTimestamp") {
        let at = meta::now_secs() + u64::try_from(new_grace).unwrap_or(0);
        m.insert("deletionTimestamp".into(), json!(meta::rfc3339(at)));
    }
    if old_grace.is_none_or(|g| new_grace < g) {
        m.insert("deletionGracePeriodSeconds".into(), json!(new_grace));
    }
    if namespace_type {
        new["status"] = json!({"phase": "Terminating"});
    }
    Ok((store.put(&key, new), false))
}

fn remove_finalizer(store: &mut Store, key: &str, obj: &Value, finalizer: &str) {
    let mut f = finalizers(obj);
    f.retain(|x| x != finalizer);
    if f.is_empty() && is_deleting(obj) && key != "/namespaces" {
        store.remove(key, namespace_of(obj), name_of(obj));
    } else {
        let mut new = obj.clone();
        set_finalizers(&mut new, &f);
        store.put(key, new);
    }
}

fn type_for_key<'a>(store: &'a Store, key: &str) -> Option<&'a ResourceType> {
    store
        .types
        .iter()
        .find(|t| resource_key(&t.group, &t.plural) == key)
}

/// One GC pass over the changes stored since the last pass: the changed objects, their
/// dependents, their owners, deleting claims in namespaces whose pods changed, and
/// terminating namespaces. Whether there were changes to look at.
fn gc_pass(store: &mut Store) -> bool {
    let changes = store.take_gc_changes();
    if changes.is_empty() {
        return false;
    }
    let namespaces_key: Arc<str> = Arc::from("/namespaces");
    let mut candidates: BTreeSet<ObjectKey> = BTreeSet::new();
    let mut pod_namespaces: BTreeSet<String> = BTreeSet::new();
    for c in &changes {
        candidates.insert(c.key.clone());
        candidates.extend(store.dependents_of(&c.uid).cloned());
        for owner in &c.owners {
            if let Some(k) = store.key_of_uid(owner) {
                candidates.insert(k.clone());
            }
        }
        if &*c.key.0 == "/pods" {
            pod_namespaces.insert(c.key.1.clone());
        }
        if !c.key.1.is_empty() {
            candidates.insert((namespaces_key.clone(), String::new(), c.key.1.clone()));
        }
    }
    let claims: Vec<ObjectKey> = store
        .deleting_objects()
        .filter(|k| &*k.0 == "/persistentvolumeclaims" && pod_namespaces.contains(&k.1))
        .cloned()
        .collect();
    candidates.extend(claims);

    // Owner references: drop references to owners deleted with `orphan`, delete objects with
    // no live owner left.
    let mut to_delete: Vec<ObjectKey> = Vec::new();
    let mut to_update: Vec<(Arc<str>, Value)> = Vec::new();
    for key in &candidates {
        let Some(obj) = store.get(&key.0, &key.1, &key.2) else {
            continue;
        };
        let Some(refs) = obj
            .pointer("/metadata/ownerReferences")
            .and_then(Value::as_array)
        else {
            continue;
        };
        let mut keep = Vec::new();
        let mut live_owner = false;
        for r in refs {
            let uid = r.get("uid").and_then(Value::as_str).unwrap_or("");
            match store.get_by_uid(uid) {
                Some(owner)
                    if is_deleting(&owner) && finalizers(&owner).iter().any(|f| f == ORPHAN) => {}
                Some(owner) => {
                    keep.push(r.clone());
                    if !(is_deleting(&owner) && finalizers(&owner).iter().any(|f| f == FOREGROUND))
                    {
                        live_owner = true;
                    }
                }
                None => keep.push(r.clone()),
            }
        }
        if keep.len() != refs.len() {
            let mut new = (*obj).clone();
            if keep.is_empty() {
                meta_mut(&mut new).remove("ownerReferences");
            } else {
                meta_mut(&mut new).insert("ownerReferences".into(), Value::Array(keep));
            }
            to_update.push((key.0.clone(), new));
        } else if !live_owner && !is_deleting(&obj) {
            to_delete.push(key.clone());
        }
    }
    for (key, obj) in to_update {
        store.put(&key, obj);
    }
    for (key, ns, name) in to_delete {
        if let Some(rt) = type_for_key(store, &key).cloned() {
            let _ = delete_locked(store, &rt, &ns, &name, &DeleteOpts::default());
        }
    }

    // Finalizers the GC itself owns.
    let mut claims_in_use: HashMap<String, HashSet<String>> = HashMap::new();
    for key in &candidates {
        let Some(current) = store.get(&key.0, &key.1, &key.2) else {
            continue;
        };
        if !is_deleting(&current) {
            continue;
        }
        let uid = current
            .pointer("/metadata/uid")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let f = finalizers(&current);
        if f.iter().any(|x| x == FOREGROUND) && store.dependents_of(&uid).next().is_none() {
            remove_finalizer(store, &key.0, &current, FOREGROUND);
        } else if f.iter().any(|x| x == ORPHAN) {
            remove_finalizer(store, &key.0, &current, ORPHAN);
        } else if &*key.0 == "/persistentvolumeclaims" && f.iter().any(|x| x == PVC_PROTECTION) {
            let ns = namespace_of(&current).to_string();
            let in_use = claims_in_use
                .entry(ns.clone())
                .or_insert_with(|| claims_used_by_pods(store, &ns));
            if !in_use.contains(name_of(&current)) {
                remove_finalizer(store, &key.0, &current, PVC_PROTECTION);
            }
        } else if &*key.0 == "/namespaces" {
            let ns = name_of(&current).to_string();
            let mut contents = Vec::new();
            for key in store.resources() {
                if let Some(rt) = type_for_key(store, &key)
                    && rt.namespaced
                {
                    for obj in store.list(&key, Some(&ns)) {
                        if !is_deleting(obj) {
                            contents.push((key.clone(), name_of(obj).to_string()));
                        }
                    }
                }
            }
            let remaining = store
                .resources()
                .iter()
                .filter(|k| type_for_key(store, k).is_some_and(|t| t.namespaced))
                .map(|k| store.list(k, Some(&ns)).count())
                .sum::<usize>();
            for (key, name) in contents {
                if let Some(rt) = type_for_key(store, &key).cloned() {
                    let _ = delete_locked(store, &rt, &ns, &name, &DeleteOpts::default());
                }
            }
            if remaining == 0 && f.is_empty() {
                store.remove("/namespaces", "", &ns);
            }
        }
    }
    true
}

/// Claims used by the pods of a namespace that have not finished (pvc-protection).
fn claims_used_by_pods(store: &Store, ns: &str) -> HashSet<String> {
    store
        .list("/pods", Some(ns))
        .filter(|p| {
            !matches!(
                p.pointer("/status/phase").and_then(Value::as_str),
                Some("Succeeded" | "Failed")
            )
        })
        .flat_map(|p| {
            p.pointer("/spec/volumes")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|v| {
                    v.pointer("/persistentVolumeClaim/claimName")
                        .and_then(Value::as_str)
                })
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt(state: &ApiState, plural: &str) -> ResourceType {
        state.resolve("", "v1", plural).unwrap()
    }

    #[test]
    fn continue_tokens_round_trip() {
        let t = encode_continue("ns", "a-b");
        assert_eq!(decode_continue(&t).unwrap(), ("ns".into(), "a-b".into()));
        assert!(decode_continue("zz").is_err());
    }

    #[test]
    fn pod_spec_is_immutable_except_images_and_node_name_once() {
        let old = json!({"spec": {"containers": [{"name": "c", "image": "a", "args": ["x"]}]}});
        let image = json!({"spec": {"containers": [{"name": "c", "image": "b", "args": ["x"]}]}});
        let args = json!({"spec": {"containers": [{"name": "c", "image": "a", "args": ["y"]}]}});
        let bind = json!({"spec": {"nodeName": "n", "containers": [{"name": "c", "image": "a", "args": ["x"]}]}});
        assert!(pod_spec_update_allowed(&old, &image));
        assert!(!pod_spec_update_allowed(&old, &args));
        assert!(pod_spec_update_allowed(&old, &bind));
        assert!(!pod_spec_update_allowed(
            &bind,
            &json!({"spec": {"nodeName": "m", "containers": [{"name": "c", "image": "a", "args": ["x"]}]}})
        ));
    }

    #[test]
    fn finalizers_hold_deletion_until_removed() {
        let s = ApiState::new(1000);
        let cm = rt(&s, "configmaps");
        s.create(
            &cm,
            "default",
            json!({"metadata": {"name": "x", "finalizers": ["a/b"]}}),
        )
        .unwrap();
        let (obj, gone) = s
            .delete(&cm, "default", "x", &DeleteOpts::default())
            .unwrap();
        assert!(!gone && is_deleting(&obj));
        let out = s
            .patch(
                &cm,
                "default",
                "x",
                PatchKind::Merge,
                &json!({"metadata": {"finalizers": null}}),
                Part::Main,
            )
            .unwrap();
        assert!(is_deleting(&out));
        assert!(s.get(&cm, "default", "x").is_err());
    }

    #[test]
    fn generation_bumps_on_spec_change_only() {
        let s = ApiState::new(1000);
        let pvc = rt(&s, "persistentvolumeclaims");
        s.create(&pvc, "default", json!({"metadata": {"name": "c"}, "spec": {"resources": {"requests": {"storage": "1Gi"}}}})).unwrap();
        let a = s
            .patch(
                &pvc,
                "default",
                "c",
                PatchKind::Merge,
                &json!({"metadata": {"labels": {"x": "y"}}}),
                Part::Main,
            )
            .unwrap();
        assert_eq!(a["metadata"]["generation"], 1);
        let b = s
            .patch(
                &pvc,
                "default",
                "c",
                PatchKind::Merge,
                &json!({"spec": {"resources": {"requests": {"storage": "2Gi"}}}}),
                Part::Main,
            )
            .unwrap();
        assert_eq!(b["metadata"]["generation"], 2);
        let c = s
            .patch(
                &pvc,
                "default",
                "c",
                PatchKind::Merge,
                &json!({"status": {"phase": "Bound"}}),
                Part::Status,
            )
            .unwrap();
        assert_eq!(c["metadata"]["generation"], 2);
        assert_eq!(c["status"]["phase"], "Bound");
    }
}
