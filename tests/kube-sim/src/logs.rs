//! Container logs captured by the simulated kubelets and served by the apiserver's `pods/log`
//! subresource. In a real cluster the kubelet keeps them and the apiserver proxies; here both
//! live in one process and share this store.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

/// (namespace, pod, container)
type Key = (String, String, String);

/// Shared, cloneable log store.
#[derive(Clone, Default, Debug)]
pub struct PodLogs {
    inner: Arc<Mutex<HashMap<Key, Vec<u8>>>>,
}

impl PodLogs {
    /// Appends output of a container.
    pub fn append(&self, namespace: &str, pod: &str, container: &str, bytes: &[u8]) {
        let mut map = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        map.entry((
            namespace.to_string(),
            pod.to_string(),
            container.to_string(),
        ))
        .or_default()
        .extend_from_slice(bytes);
    }

    /// The whole log of a container; with `container: None`, of the pod's only (or first by
    /// name) container. `None` when nothing was logged.
    pub fn read(&self, namespace: &str, pod: &str, container: Option<&str>) -> Option<Vec<u8>> {
        let map = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let mut matches: Vec<(&Key, &Vec<u8>)> = map
            .iter()
            .filter(|((ns, p, c), _)| {
                ns == namespace && p == pod && container.is_none_or(|want| want == c)
            })
            .collect();
        matches.sort_by(|a, b| a.0.cmp(b.0));
        matches.first().map(|(_, bytes)| (*bytes).clone())
    }

    /// Forgets a deleted pod's logs.
    pub fn remove_pod(&self, namespace: &str, pod: &str) {
        let mut map = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        map.retain(|(ns, p, _), _| !(ns == namespace && p == pod));
    }
}
