//! In-memory storage: every object by resource, namespace and name, one global
//! `resourceVersion` counter, and a bounded history of change events for watches to resume
//! from (older versions answer `410 Gone`, like etcd compaction).

use std::collections::{BTreeMap, HashMap, VecDeque};
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
        self.record(rkey, EventType::Deleted, last.clone(), Some(old));
        Some(last)
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
}
