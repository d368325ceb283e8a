//! In-memory storage: every object by resource, namespace and name, one global
//! `resourceVersion` counter, and a bounded history of change events for watches to resume
//! from (older versions answer `410 Gone`, like etcd compaction).
//!
//! The store also keeps what the garbage collector needs to work incrementally: objects by
//! uid, dependents by owner uid, and the changes the collector has not looked at yet. A full
//! scan of every object on every write, under the store lock, stalls the whole apiserver once
//! there are tens of thousands of objects.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, OnceLock};

use serde_json::Value;
use tokio::sync::broadcast;

use super::resources::ResourceType;

/// `ADDED`, `MODIFIED` or `DELETED`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// The object was created.
    Added,
    /// The object changed.
    Modified,
    /// The object was removed.
    Deleted,
}

impl EventType {
    /// The watch event `type` string.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One stored change.
#[derive(Debug)]
pub struct Event {
    /// The resourceVersion of the change.
    pub rv: u64,
    /// `group/plural` of the object.
    pub resource: Arc<str>,
    /// What happened.
    pub kind: EventType,
    /// The object after the change (for `DELETED`, the last state).
    pub object: Arc<Value>,
    /// The object before a modification, so filtered watches can turn it into ADDED/DELETED.
    pub old: Option<Arc<Value>>,
    /// `object` serialised once for all watchers.
    encoded: OnceLock<String>,
}

impl Event {
    /// The object as JSON text.
    pub fn encoded_object(&self) -> &str {
        self.encoded
            .get_or_init(|| serde_json::to_string(&*self.object).unwrap_or_default())
    }
}

/// `group/plural`, the storage key of a resource (shared by all of its versions).
pub fn resource_key(group: &str, plural: &str) -> String {
    format!("{group}/{plural}")
}

type Objects = BTreeMap<(String, String), Arc<Value>>;

/// Where an object is stored: resource key, namespace, name.
pub type ObjectKey = (Arc<str>, String, String);

/// A stored change the garbage collector may have work for.
#[derive(Debug, Clone)]
pub struct GcChange {
    /// The changed object.
    pub key: ObjectKey,
    /// Its uid.
    pub uid: String,
    /// Owner uids it referenced before or after the change.
    pub owners: Vec<String>,
}

/// The garbage collector's indexes.
#[derive(Debug, Default)]
struct GcIndex {
    by_uid: HashMap<String, ObjectKey>,
    dependents: HashMap<String, BTreeSet<ObjectKey>>,
    /// Objects with a `deletionTimestamp` (few at any time).
    deleting: BTreeSet<ObjectKey>,
    pending: Vec<GcChange>,
}

fn uid_of(obj: &Value) -> &str {
    meta_str(obj, "uid")
}

fn owner_uids(obj: &Value) -> Vec<String> {
    obj.pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .map(|refs| {
            refs.iter()
                .filter_map(|r| r.get("uid").and_then(Value::as_str))
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

fn deleting(obj: &Value) -> bool {
    obj.pointer("/metadata/deletionTimestamp")
        .is_some_and(|v| !v.is_null())
}

/// Whether a modification can change a garbage-collection decision: owners, deletion state,
/// finalizers, or (for pvc-protection) a pod finishing. Status churn of owned objects cannot.
fn gc_relevant_change(resource: &str, old: &Value, new: &Value) -> bool {
    let meta = |o: &Value, f: &str| o.get("metadata").and_then(|m| m.get(f)).cloned();
    meta(old, "ownerReferences") != meta(new, "ownerReferences")
        || meta(old, "deletionTimestamp") != meta(new, "deletionTimestamp")
        || meta(old, "finalizers") != meta(new, "finalizers")
        || (resource == "/pods" && old.pointer("/status/phase") != new.pointer("/status/phase"))
}

/// All objects and the change history.
#[derive(Debug)]
pub struct Store {
    rv: u64,
    /// Served resource types.
    pub types: Vec<ResourceType>,
    objects: HashMap<Arc<str>, Objects>,
    history: VecDeque<Arc<Event>>,
    /// Watches must start at or after this resourceVersion.
    history_floor: u64,
    history_cap: usize,
    tx: broadcast::Sender<Arc<Event>>,
    /// Incremented by a simulated apiserver restart; open watches end when it changes.
    pub epoch: u64,
    gc: GcIndex,
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> &'a str {
    obj.get("metadata")
        .and_then(|m| m.get(field))
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// `metadata.namespace` (empty for cluster-scoped objects).
pub fn namespace_of(obj: &Value) -> &str {
    meta_str(obj, "namespace")
}

/// `metadata.name`.
pub fn name_of(obj: &Value) -> &str {
    meta_str(obj, "name")
}

/// `metadata.resourceVersion` parsed.
pub fn rv_of(obj: &Value) -> Option<u64> {
    meta_str(obj, "resourceVersion").parse().ok()
}

impl Store {
    /// An empty store serving the given types.
    pub fn new(types: Vec<ResourceType>, history_cap: usize) -> Store {
        let (tx, _) = broadcast::channel(65_536);
        Store {
            rv: 1,
            types,
            objects: HashMap::new(),
            history: VecDeque::new(),
            history_floor: 1,
            history_cap,
            tx,
            epoch: 0,
            gc: GcIndex::default(),
        }
    }

    /// The current resourceVersion.
    pub fn rv(&self) -> u64 {
        self.rv
    }

    /// The oldest resourceVersion a watch may resume from.
    pub fn history_floor(&self) -> u64 {
        self.history_floor
    }

    /// Forgets the change history, as a restarted apiserver's empty watch cache does.
    pub fn expire_history(&mut self) {
        self.history.clear();
        self.history_floor = self.rv;
        self.epoch += 1;
    }

    /// Subscribes to live events.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.tx.subscribe()
    }

    /// Stored events of a resource after `rv`, or `None` when `rv` is older than the history.
    pub fn events_since(&self, resource: &str, rv: u64) -> Option<Vec<Arc<Event>>> {
        if rv < self.history_floor {
            return None;
        }
        let start = self.history.partition_point(|e| e.rv <= rv);
        Some(
            self.history
                .range(start..)
                .filter(|e| &*e.resource == resource)
                .cloned()
                .collect(),
        )
    }

    /// One object.
    pub fn get(&self, resource: &str, ns: &str, name: &str) -> Option<Arc<Value>> {
        self.objects
            .get(resource)?
            .get(&(ns.to_string(), name.to_string()))
            .cloned()
    }

    /// Objects of a resource, sorted by namespace then name; `ns: None` for all namespaces.
    pub fn list<'a>(
        &'a self,
        resource: &str,
        ns: Option<&'a str>,
    ) -> Box<dyn Iterator<Item = &'a Arc<Value>> + 'a> {
        let Some(map) = self.objects.get(resource) else {
            return Box::new(std::iter::empty());
        };
        match ns {
            None => Box::new(map.values()),
            Some(ns) => Box::new(
                map.range((ns.to_string(), String::new())..)
                    .take_while(move |((n, _), _)| n == ns)
                    .map(|(_, v)| v),
            ),
        }
    }

    /// Objects after a (namespace, name) key, for `continue` tokens.
    pub fn list_after<'a>(
        &'a self,
        resource: &str,
        after: (String, String),
    ) -> Box<dyn Iterator<Item = &'a Arc<Value>> + 'a> {
        let Some(map) = self.objects.get(resource) else {
            return Box::new(std::iter::empty());
        };
        Box::new(
            map.range((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded))
                .map(|(_, v)| v),
        )
    }

    /// Every resource key with stored objects.
    pub fn resources(&self) -> Vec<Arc<str>> {
        self.objects.keys().cloned().collect()
    }

    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn record(
        &mut self,
        resource: Arc<str>,
        kind: EventType,
        object: Arc<Value>,
        old: Option<Arc<Value>>,
    ) {
        let event = Arc::new(Event {
            rv: self.rv,
            resource,
            kind,
            object,
            old,
            encoded: OnceLock::new(),
        });
        self.history.push_back(event.clone());
        while self.history.len() > self.history_cap {
            if let Some(dropped) = self.history.pop_front() {
                self.history_floor = dropped.rv;
            }
        }
        // Nobody listening is fine.
        let _ = self.tx.send(event);
    }

    fn key_arc(&mut self, resource: &str) -> Arc<str> {
        match self.objects.get_key_value(resource) {
            Some((k, _)) => k.clone(),
            None => {
                let k: Arc<str> = Arc::from(resource);
                self.objects.insert(k.clone(), BTreeMap::new());
                k
            }
        }
    }

    /// Stores an object (new or changed) under a fresh resourceVersion and records the event.
    pub fn put(&mut self, resource: &str, mut obj: Value) -> Arc<Value> {
        let rv = self.next_rv();
        if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("resourceVersion".into(), Value::String(rv.to_string()));
        }
        let key = (namespace_of(&obj).to_string(), name_of(&obj).to_string());
        let obj = Arc::new(obj);
        let rkey = self.key_arc(resource);
        let old = self
            .objects
            .get_mut(&rkey)
            .and_then(|m| m.insert(key, obj.clone()));
        let kind = if old.is_some() {
            EventType::Modified
        } else {
            EventType::Added
        };
        self.index_for_gc(&rkey, old.as_deref(), Some(&*obj));
        self.record(rkey, kind, obj.clone(), old);
        obj
    }

    /// Removes an object; the `DELETED` event carries a fresh resourceVersion.
    pub fn remove(&mut self, resource: &str, ns: &str, name: &str) -> Option<Arc<Value>> {
        let rkey = self.key_arc(resource);
        let old = self
            .objects
            .get_mut(&rkey)?
            .remove(&(ns.to_string(), name.to_string()))?;
        let rv = self.next_rv();
        let mut last = (*old).clone();
        if let Some(meta) = last.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("resourceVersion".into(), Value::String(rv.to_string()));
        }
        let last = Arc::new(last);
        self.index_for_gc(&rkey, Some(&*old), None);
        self.record(rkey, EventType::Deleted, last.clone(), Some(old));
        Some(last)
    }

    /// Keeps the garbage collector's indexes in step with a write (`new: None` for a removal)
    /// and queues the change when it may matter to the collector.
    fn index_for_gc(&mut self, resource: &Arc<str>, old: Option<&Value>, new: Option<&Value>) {
        let Some(any) = new.or(old) else {
            return;
        };
        let key: ObjectKey = (
            resource.clone(),
            namespace_of(any).to_string(),
            name_of(any).to_string(),
        );
        let uid = uid_of(any).to_string();
        let old_owners = old.map(owner_uids).unwrap_or_default();
        let new_owners = new.map(owner_uids).unwrap_or_default();
        for o in &old_owners {
            if !new_owners.contains(o)
                && let Some(set) = self.gc.dependents.get_mut(o)
            {
                set.remove(&key);
                if set.is_empty() {
                    self.gc.dependents.remove(o);
                }
            }
        }
        for o in &new_owners {
            self.gc
                .dependents
                .entry(o.clone())
                .or_default()
                .insert(key.clone());
        }
        match new {
            Some(n) => {
                if let Some(o) = old
                    && uid_of(o) != uid
                {
                    self.gc.by_uid.remove(uid_of(o));
                }
                if !uid.is_empty() {
                    self.gc.by_uid.insert(uid.clone(), key.clone());
                }
                if deleting(n) {
                    self.gc.deleting.insert(key.clone());
                } else {
                    self.gc.deleting.remove(&key);
                }
            }
            None => {
                if self.gc.by_uid.get(&uid) == Some(&key) {
                    self.gc.by_uid.remove(&uid);
                }
                self.gc.deleting.remove(&key);
            }
        }
        let relevant = match (old, new) {
            (Some(o), Some(n)) => gc_relevant_change(resource, o, n),
            (None, Some(_)) => !new_owners.is_empty(),
            _ => true,
        };
        if relevant {
            let mut owners = old_owners;
            for o in new_owners {
                if !owners.contains(&o) {
                    owners.push(o);
                }
            }
            self.gc.pending.push(GcChange { key, uid, owners });
        }
    }

    /// Whether changes wait for the garbage collector.
    pub fn gc_pending(&self) -> bool {
        !self.gc.pending.is_empty()
    }

    /// Takes the changes the garbage collector has not looked at yet.
    pub fn take_gc_changes(&mut self) -> Vec<GcChange> {
        std::mem::take(&mut self.gc.pending)
    }

    /// Where the object with this uid is stored.
    pub fn key_of_uid(&self, uid: &str) -> Option<&ObjectKey> {
        self.gc.by_uid.get(uid)
    }

    /// The object with this uid.
    pub fn get_by_uid(&self, uid: &str) -> Option<Arc<Value>> {
        let (r, ns, name) = self.gc.by_uid.get(uid)?;
        self.objects
            .get(r)?
            .get(&(ns.clone(), name.clone()))
            .cloned()
    }

    /// Objects that list this uid among their owners.
    pub fn dependents_of(&self, uid: &str) -> impl Iterator<Item = &ObjectKey> + '_ {
        self.gc.dependents.get(uid).into_iter().flatten()
    }

    /// Objects with a `deletionTimestamp`.
    pub fn deleting_objects(&self) -> impl Iterator<Item = &ObjectKey> + '_ {
        self.gc.deleting.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(ns: &str, name: &str) -> Value {
        json!({"metadata": {"namespace": ns, "name": name}})
    }

    #[test]
    fn versions_increase_and_history_expires() {
        let mut s = Store::new(Vec::new(), 3);
        let a = s.put("/pods", obj("a", "1"));
        let first = rv_of(&a).unwrap();
        s.put("/pods", obj("b", "1"));
        s.put("/pods", obj("a", "2"));
        assert_eq!(s.events_since("/pods", first).unwrap().len(), 2);
        s.put("/pods", obj("a", "3"));
        s.put("/pods", obj("a", "4"));
        assert!(s.events_since("/pods", first).is_none(), "compacted");
        assert_eq!(s.list("/pods", Some("a")).count(), 4);
        assert_eq!(s.list("/pods", None).count(), 5);
        let gone = s.remove("/pods", "a", "1").unwrap();
        assert_eq!(rv_of(&gone), Some(s.rv()));
        s.expire_history();
        assert!(s.events_since("/pods", s.rv() - 1).is_none());
        assert_eq!(s.events_since("/pods", s.rv()).unwrap().len(), 0);
    }

    #[test]
    fn gc_work_is_queued_for_owner_and_deletion_changes_not_status_churn() {
        let mut s = Store::new(Vec::new(), 100);
        s.put(
            "/configmaps",
            json!({"metadata": {"namespace": "a", "name": "o", "uid": "u1"}}),
        );
        assert!(!s.gc_pending(), "an object without owners is no GC work");
        let dep = json!({
            "metadata": {"namespace": "a", "name": "d", "uid": "u2",
                         "ownerReferences": [{"uid": "u1"}]},
            "status": {"phase": "Pending"},
        });
        s.put("/pods", dep.clone());
        assert_eq!(s.take_gc_changes().len(), 1, "a new dependent is checked");
        let mut churn = dep.clone();
        churn["status"]["message"] = json!("pulling");
        s.put("/pods", churn);
        assert!(!s.gc_pending(), "status churn of a dependent is no GC work");
        let mut done = dep.clone();
        done["status"]["phase"] = json!("Succeeded");
        s.put("/pods", done);
        assert!(
            s.gc_pending(),
            "a finished pod may release a protected claim"
        );
        s.take_gc_changes();
        assert_eq!(s.dependents_of("u1").count(), 1);
        assert_eq!(
            s.get_by_uid("u1").map(|o| name_of(&o).to_string()),
            Some("o".into())
        );
        s.remove("/configmaps", "a", "o");
        let changes = s.take_gc_changes();
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].uid, "u1", "a removed owner is checked");
        assert!(s.get_by_uid("u1").is_none());
        s.remove("/pods", "a", "d");
        assert_eq!(s.dependents_of("u1").count(), 0);
    }
}
