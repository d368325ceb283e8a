//! An opt-in request audit log: who (User-Agent) asked for what, in the terms Kubernetes RBAC
//! authorizes — verb, API group, resource, subresource, namespace. Tests turn it on to compare
//! the calls a component really makes with the Role rules it is installed with.
//!
//! A request is recorded once its path names a resource, before it is served: RBAC authorizes
//! an attempt, whatever its outcome, so a 404 or a 409 counts like a success. Discovery and
//! other non-resource paths (`/api`, `/apis/...`, `/version`, `/openapi/...`) are not recorded:
//! on a real cluster every authenticated user may read them (the `system:discovery` role).
//! A server-side apply that creates its object is recorded twice, as `create` and `patch`:
//! kube-apiserver authorizes it as both.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use axum::http::Method;

/// One audited request.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AuditRecord {
    /// The `User-Agent` header; empty when the client sent none (kube-rs sends none unless
    /// the client's `Config::headers` sets one).
    pub user_agent: String,
    /// The RBAC verb: get, list, watch, create, update, patch, delete, deletecollection.
    pub verb: String,
    /// The API group; empty for the core group.
    pub group: String,
    /// The resource's plural name (`pods`, `loratrainingjobs`).
    pub resource: String,
    /// The subresource (`status`, `log`, `binding`), if any.
    pub subresource: Option<String>,
    /// The namespace of the request; `None` for cluster-scoped resources and for requests
    /// across all namespaces.
    pub namespace: Option<String>,
    /// The object's name, for requests about one object.
    pub name: Option<String>,
}

impl AuditRecord {
    /// `resource` or `resource/subresource`, as RBAC rules spell it.
    pub fn rbac_resource(&self) -> String {
        match &self.subresource {
            Some(sub) => format!("{}/{sub}", self.resource),
            None => self.resource.clone(),
        }
    }
}

/// The request facts the HTTP layer hands over.
#[derive(Debug)]
pub(crate) struct Call<'a> {
    /// A server-side apply of an object that does not exist yet: authorized as `patch` and
    /// `create`, like kube-apiserver does.
    pub(crate) apply_creates: bool,
    pub(crate) method: &'a Method,
    pub(crate) user_agent: Option<&'a str>,
    /// `?watch=true` (or `1`).
    pub(crate) watch: bool,
    pub(crate) group: &'a str,
    pub(crate) resource: &'a str,
    pub(crate) subresource: Option<&'a str>,
    pub(crate) namespace: Option<&'a str>,
    pub(crate) name: Option<&'a str>,
}

/// The RBAC verb of a request, as the apiserver's request-info resolver names it; `None` for
/// methods RBAC does not authorize per resource (OPTIONS, CONNECT, ...).
pub fn rbac_verb(method: &Method, has_name: bool, watch: bool) -> Option<&'static str> {
    let verb = match *method {
        Method::GET | Method::HEAD if watch => "watch",
        Method::GET | Method::HEAD if has_name => "get",
        Method::GET | Method::HEAD => "list",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE if has_name => "delete",
        Method::DELETE => "deletecollection",
        _ => return None,
    };
    Some(verb)
}

/// The audit log. Off until `enable`; recording costs one atomic load while off.
#[derive(Debug, Default)]
pub struct Audit {
    enabled: AtomicBool,
    records: Mutex<Vec<AuditRecord>>,
}

impl Audit {
    /// Starts recording every resource request.
    pub fn enable(&self) {
        self.enabled.store(true, Ordering::SeqCst);
    }

    /// Stops recording (what was recorded stays).
    pub fn disable(&self) {
        self.enabled.store(false, Ordering::SeqCst);
    }

    /// Whether requests are being recorded.
    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::SeqCst)
    }

    /// Everything recorded so far, in arrival order.
    pub fn snapshot(&self) -> Vec<AuditRecord> {
        self.records
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Forgets what was recorded.
    pub fn clear(&self) {
        self.records
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    pub(crate) fn record(&self, call: Call<'_>) {
        if !self.is_enabled() {
            return;
        }
        let Some(verb) = rbac_verb(call.method, call.name.is_some(), call.watch) else {
            return;
        };
        let record = AuditRecord {
            user_agent: call.user_agent.unwrap_or_default().to_string(),
            verb: verb.to_string(),
            group: call.group.to_string(),
            resource: call.resource.to_string(),
            subresource: call.subresource.map(str::to_string),
            namespace: call.namespace.map(str::to_string),
            name: call.name.map(str::to_string),
        };
        let mut records = self.records.lock().unwrap_or_else(PoisonError::into_inner);
        if call.apply_creates {
            records.push(AuditRecord {
                verb: "create".to_string(),
                ..record.clone()
            });
        }
        records.push(record);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbs_are_named_as_rbac_names_them() {
        let cases = [
            (Method::GET, false, false, Some("list")),
            (Method::GET, false, true, Some("watch")),
            (Method::GET, true, true, Some("watch")),
            (Method::GET, true, false, Some("get")),
            (Method::POST, false, false, Some("create")),
            (Method::POST, true, false, Some("create")),
            (Method::PUT, true, false, Some("update")),
            (Method::PATCH, true, false, Some("patch")),
            (Method::DELETE, true, false, Some("delete")),
            (Method::DELETE, false, false, Some("deletecollection")),
            (Method::OPTIONS, false, false, None),
        ];
        for (method, named, watch, want) in cases {
            assert_eq!(
                rbac_verb(&method, named, watch),
                want,
                "{method} {named} {watch}"
            );
        }
    }

    #[test]
    fn nothing_is_recorded_until_enabled() {
        let audit = Audit::default();
        let call = || Call {
            apply_creates: false,
            method: &Method::GET,
            user_agent: Some("me"),
            watch: false,
            group: "",
            resource: "pods",
            subresource: Some("log"),
            namespace: Some("ns"),
            name: Some("p"),
        };
        audit.record(call());
        assert!(audit.snapshot().is_empty());
        audit.enable();
        audit.record(call());
        let got = audit.snapshot();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].verb, "get");
        assert_eq!(got[0].rbac_resource(), "pods/log");
        audit.disable();
        audit.record(call());
        assert_eq!(audit.snapshot().len(), 1);
        audit.clear();
        assert!(audit.snapshot().is_empty());
    }
}
