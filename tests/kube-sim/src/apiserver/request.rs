//! What the route table and the handlers share: the server context, a request's path
//! captures and decoded parts, query-string and body decoding, and the JSON responses
//! (objects, lists, `Status` errors).

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::audit::Audit;
use super::faults::Faults;
use super::meta::ApiError;
use super::ops::ApiState;
use super::protobuf;
use super::resources::ResourceType;
use crate::logs::PodLogs;

/// Shared by all requests.
#[derive(Debug, Clone)]
pub(crate) struct Ctx {
    pub(crate) state: Arc<ApiState>,
    pub(crate) faults: Arc<Faults>,
    pub(crate) logs: PodLogs,
    pub(crate) audit: Arc<Audit>,
}

/// Largest accepted request body.
pub(crate) const MAX_BODY: usize = 16 * 1024 * 1024;

pub(crate) fn json_response(code: u16, body: &Value) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut resp = Response::new(Body::from(bytes));
    *resp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

pub(crate) fn error_response(e: &ApiError) -> Response {
    let mut resp = json_response(e.code, &e.status());
    if e.code == 429 {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error_response(&self)
    }
}

/// A header's value, when present and readable as text.
pub(crate) fn header_str(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

pub(crate) fn percent_decode(s: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).and_then(|d| u8::try_from(d).ok())
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub(crate) fn parse_query(q: Option<&str>) -> HashMap<String, String> {
    q.unwrap_or("")
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

pub(crate) fn is_true(q: &HashMap<String, String>, key: &str) -> bool {
    q.get(key).is_some_and(|v| v == "true" || v == "1")
}

/// Decodes an object body by its Content-Type: Kubernetes protobuf (what kubectl and
/// client-go send for built-in kinds), YAML, or JSON (the default).
pub(crate) fn parse_body(headers: &HeaderMap, bytes: &[u8]) -> Result<Value, ApiError> {
    let ct = header_str(headers, header::CONTENT_TYPE).unwrap_or("application/json");
    if ct.contains("protobuf") {
        protobuf::decode(bytes)
    } else if ct.contains("yaml") {
        serde_yaml::from_slice(bytes)
            .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))
    } else {
        serde_json::from_slice(bytes)
            .map_err(|e| ApiError::bad_request(format!("error decoding JSON: {e}")))
    }
}

/// What a pattern's `{…}` segments captured (percent-decoded).
#[derive(Debug, Default, PartialEq)]
pub(super) struct Params {
    /// `""` for the core group.
    pub(super) group: String,
    pub(super) version: String,
    pub(super) namespace: Option<String>,
    pub(super) resource: String,
    pub(super) name: Option<String>,
    pub(super) subresource: Option<String>,
}

impl Params {
    /// Stores a capture; `None` for a field [`Params`] does not have.
    pub(super) fn set(&mut self, field: &str, value: &str) -> Option<()> {
        let value = value.to_string();
        match field {
            "group" => self.group = value,
            "version" => self.version = value,
            "namespace" => self.namespace = Some(value),
            "resource" => self.resource = value,
            "name" => self.name = Some(value),
            "subresource" => self.subresource = Some(value),
            _ => return None,
        }
        Some(())
    }
}

/// A resource request, as its handler sees it.
#[derive(Debug)]
pub(super) struct Req {
    pub(super) rt: ResourceType,
    /// Namespace from the path (`None` for cluster-scoped or all-namespaces requests).
    pub(super) namespace: Option<String>,
    pub(super) name: Option<String>,
    pub(super) subresource: Option<String>,
    pub(super) method: Method,
    pub(super) query: HashMap<String, String>,
    pub(super) headers: HeaderMap,
    /// The `Accept` header (`""` when absent).
    pub(super) accept: String,
    pub(super) body: Bytes,
}

impl Req {
    /// The namespace, `""` when the path has none.
    pub(super) fn ns(&self) -> &str {
        self.namespace.as_deref().unwrap_or_default()
    }

    /// The object's name (rows with handlers that call this all capture `{name}`).
    pub(super) fn name(&self) -> &str {
        self.name.as_deref().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_percent_decoded() {
        let q = parse_query(Some("labelSelector=app%20in%20(a%2Cb)&watch=1&x"));
        assert_eq!(q["labelSelector"], "app in (a,b)");
        assert!(is_true(&q, "watch"));
        assert_eq!(q["x"], "");
        assert_eq!(percent_decode("a%2"), "a%2");
    }
}
