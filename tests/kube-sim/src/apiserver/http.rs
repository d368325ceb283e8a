//! HTTP routing: turns REST paths, query parameters and bodies into verbs on the store, and
//! results into JSON (objects, lists, Tables, `Status` errors).

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::Faults;
use super::audit::{Audit, Call};
use super::meta::ApiError;
use super::ops::{ApiState, DeleteOpts, ListOpts, Part};
use super::patch::PatchKind;
use super::resources::{self, ResourceType};
use super::selectors::{FieldSelector, LabelSelector};
use super::table;
use super::watch::{self, WatchParams};
use crate::logs::PodLogs;

/// Shared by all requests.
#[derive(Debug, Clone)]
pub(crate) struct Ctx {
    pub(crate) state: Arc<ApiState>,
    pub(crate) faults: Arc<Faults>,
    logs: PodLogs,
    audit: Arc<Audit>,
}

/// The router serving everything through one handler.
pub(crate) fn router(
    state: Arc<ApiState>,
    faults: Arc<Faults>,
    logs: PodLogs,
    audit: Arc<Audit>,
) -> Router {
    Router::new().fallback(handle).with_state(Ctx {
        state,
        faults,
        logs,
        audit,
    })
}

/// Largest accepted request body.
const MAX_BODY: usize = 16 * 1024 * 1024;

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

fn error_response(e: &ApiError) -> Response {
    let mut resp = json_response(e.code, &e.status());
    if e.code == 429 {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}

fn percent_decode(s: &str) -> String {
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

fn parse_query(q: Option<&str>) -> HashMap<String, String> {
    q.unwrap_or("")
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn is_true(q: &HashMap<String, String>, key: &str) -> bool {
    q.get(key).is_some_and(|v| v == "true" || v == "1")
}

/// Where a request points.
#[derive(Debug)]
struct Target {
    rt: ResourceType,
    /// Namespace from the path (`None` for cluster-scoped or all-namespaces requests).
    namespace: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

fn parse_body(headers: &HeaderMap, bytes: &[u8]) -> Result<Value, ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    if ct.contains("protobuf") {
        return Err(ApiError::new(
            415,
            "UnsupportedMediaType",
            "protobuf is not supported by kube-sim; send JSON",
        ));
    }
    if ct.contains("yaml") {
        serde_yaml::from_slice(bytes)
            .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))
    } else {
        serde_json::from_slice(bytes)
            .map_err(|e| ApiError::bad_request(format!("error decoding JSON: {e}")))
    }
}

async fn handle(State(ctx): State<Ctx>, req: Request) -> Response {
    let method = req.method().clone();
    let write = matches!(
        method,
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    );
    let user_agent = req
        .headers()
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok());
    let (latency, injected) = ctx.faults.decide(write, user_agent);
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    if let Some(code) = injected {
        let e = match code {
            429 => ApiError::new(
                429,
                "TooManyRequests",
                "kube-sim: injected fault: too many requests, please try again later",
            ),
            409 => ApiError::new(
                409,
                "Conflict",
                "kube-sim: injected fault: Operation cannot be fulfilled: the object has been modified; please apply your changes to the latest version and try again",
            ),
            503 => ApiError::new(
                503,
                "ServiceUnavailable",
                "kube-sim: injected fault: service unavailable",
            ),
            _ => ApiError::new(
                500,
                "InternalError",
                "kube-sim: injected fault: an error on the server has prevented the request from succeeding",
            ),
        };
        return error_response(&e);
    }
    match route(&ctx, req).await {
        Ok(resp) => resp,
        Err(e) => error_response(&e),
    }
}

async fn route(ctx: &Ctx, req: Request) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let query = parse_query(parts.uri.query());
    let segs: Vec<String> = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(percent_decode)
        .collect();
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let get = parts.method == Method::GET;
    // Discovery needs every type; resource requests look up one (cloning all is too slow for
    // the write path).
    let discovery = matches!(
        segs.as_slice(),
        ["api"] | ["api", _] | ["apis"] | ["apis", _] | ["apis", _, _] | ["openapi", ..]
    );
    let types = if discovery {
        ctx.state.types()
    } else {
        Vec::new()
    };
    match segs.as_slice() {
        ["version"] if get => {
            return Ok(json_response(
                200,
                &json!({
                    "major": "1", "minor": "33", "gitVersion": "v1.33.0-kube-sim", "gitCommit": "kube-sim",
                    "gitTreeState": "clean", "buildDate": "2025-01-01T00:00:00Z", "goVersion": "n/a",
                    "compiler": "rustc", "platform": "linux/amd64"
                }),
            ));
        }
        ["healthz" | "readyz" | "livez"] if get => {
            return Ok(Response::new(Body::from("ok")));
        }
        ["api"] if get => return Ok(json_response(200, &resources::core_versions())),
        ["apis"] if get => return Ok(json_response(200, &resources::group_list(&types))),
        ["api", v] if get => {
            return resources::resource_list(&types, "", v)
                .map(|l| json_response(200, &l))
                .ok_or_else(|| ApiError::no_route(&path));
        }
        ["apis", g] if get => {
            return resources::group(&types, g)
                .map(|l| json_response(200, &l))
                .ok_or_else(|| ApiError::no_route(&path));
        }
        ["apis", g, v] if get => {
            return resources::resource_list(&types, g, v)
                .map(|l| json_response(200, &l))
                .ok_or_else(|| ApiError::no_route(&path));
        }
        ["openapi", "v3"] if get => return Ok(json_response(200, &super::openapi::root(&types))),
        ["openapi", "v3", "api", v] if get => {
            return super::openapi::group_version(&types, "", v)
                .map(|d| json_response(200, &d))
                .ok_or_else(|| ApiError::no_route(&path));
        }
        ["openapi", "v3", "apis", g, v] if get => {
            return super::openapi::group_version(&types, g, v)
                .map(|d| json_response(200, &d))
                .ok_or_else(|| ApiError::no_route(&path));
        }
        _ => {}
    }
    let (group, version, rest): (&str, &str, &[&str]) = match segs.as_slice() {
        ["api", v, rest @ ..] => ("", v, rest),
        ["apis", g, v, rest @ ..] => (g, v, rest),
        _ => return Err(ApiError::no_route(&path)),
    };
    let find = |plural: &str| {
        ctx.state
            .resolve(group, version, plural)
            .ok_or_else(|| ApiError::no_route(&path))
    };
    let s = |x: &str| Some(x.to_string());
    let target = match rest {
        [plural] => Target {
            rt: find(plural)?,
            namespace: None,
            name: None,
            sub: None,
        },
        ["namespaces", name, sub @ ("status" | "finalize")] if group.is_empty() => Target {
            rt: find("namespaces")?,
            namespace: None,
            name: s(name),
            sub: s(sub),
        },
        ["namespaces", ns, plural] => Target {
            rt: find(plural)?,
            namespace: s(ns),
            name: None,
            sub: None,
        },
        ["namespaces", ns, plural, name] => Target {
            rt: find(plural)?,
            namespace: s(ns),
            name: s(name),
            sub: None,
        },
        ["namespaces", ns, plural, name, sub] => Target {
            rt: find(plural)?,
            namespace: s(ns),
            name: s(name),
            sub: s(sub),
        },
        [plural, name] => Target {
            rt: find(plural)?,
            namespace: None,
            name: s(name),
            sub: None,
        },
        [plural, name, sub] => Target {
            rt: find(plural)?,
            namespace: None,
            name: s(name),
            sub: s(sub),
        },
        _ => return Err(ApiError::no_route(&path)),
    };
    if target.rt.namespaced != target.namespace.is_some()
        && (target.name.is_some() || parts.method != Method::GET && parts.method != Method::DELETE)
    {
        return Err(ApiError::no_route(&path));
    }
    if !target.rt.namespaced && target.namespace.is_some() {
        return Err(ApiError::no_route(&path));
    }
    // kube-apiserver authorizes a server-side apply that creates the object as `create` too.
    let apply_creates = ctx.audit.is_enabled()
        && parts.method == Method::PATCH
        && parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("application/apply-patch"))
        && target.name.as_deref().is_some_and(|name| {
            ctx.state
                .get(
                    &target.rt,
                    target.namespace.as_deref().unwrap_or_default(),
                    name,
                )
                .is_err()
        });
    ctx.audit.record(Call {
        apply_creates,
        method: &parts.method,
        user_agent: parts
            .headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok()),
        watch: is_true(&query, "watch"),
        group,
        resource: &target.rt.plural,
        subresource: target.sub.as_deref(),
        namespace: target.namespace.as_deref(),
        name: target.name.as_deref(),
    });
    let accept = parts
        .headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = axum::body::to_bytes(body, MAX_BODY)
        .await
        .map_err(|e| ApiError::bad_request(format!("reading the request body: {e}")))?;
    verb(
        ctx,
        &parts.method,
        &parts.headers,
        &query,
        &accept,
        target,
        body,
    )
    .await
}

fn list_opts(q: &HashMap<String, String>) -> Result<ListOpts, ApiError> {
    Ok(ListOpts {
        labels: LabelSelector::parse(q.get("labelSelector").map_or("", String::as_str))
            .map_err(ApiError::bad_request)?,
        fields: FieldSelector::parse(q.get("fieldSelector").map_or("", String::as_str))
            .map_err(ApiError::bad_request)?,
        limit: q.get("limit").and_then(|l| l.parse().ok()),
        continue_token: q.get("continue").filter(|c| !c.is_empty()).cloned(),
    })
}

fn list_body(
    rt: &ResourceType,
    items: &[Arc<Value>],
    rv: u64,
    next: Option<&str>,
    accept: &str,
) -> Value {
    if table::wants_table(accept) {
        let objs: Vec<&Value> = items.iter().map(|i| &**i).collect();
        return table::table(rt, &objs, rv, next);
    }
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if let Some(c) = next {
        metadata["continue"] = json!(c);
    }
    json!({
        "kind": format!("{}List", rt.kind),
        "apiVersion": rt.api_version(),
        "metadata": metadata,
        "items": items.iter().map(|i| &**i).collect::<Vec<_>>(),
    })
}

fn object_body(rt: &ResourceType, obj: &Value, accept: &str) -> Value {
    if table::wants_table(accept) {
        let rv = obj
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .and_then(|r| r.parse().ok())
            .unwrap_or(0);
        return table::table(rt, &[obj], rv, None);
    }
    obj.clone()
}

fn delete_opts(q: &HashMap<String, String>, body: &[u8]) -> DeleteOpts {
    let parsed: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let mut propagation = parsed
        .get("propagationPolicy")
        .and_then(Value::as_str)
        .map(String::from)
        .or_else(|| q.get("propagationPolicy").cloned());
    if propagation.is_none()
        && parsed.get("orphanDependents").and_then(Value::as_bool) == Some(true)
    {
        propagation = Some("Orphan".to_string());
    }
    DeleteOpts {
        grace_period: parsed
            .get("gracePeriodSeconds")
            .and_then(Value::as_i64)
            .or_else(|| q.get("gracePeriodSeconds").and_then(|g| g.parse().ok())),
        propagation,
        precondition_rv: parsed
            .pointer("/preconditions/resourceVersion")
            .and_then(Value::as_str)
            .map(String::from),
        precondition_uid: parsed
            .pointer("/preconditions/uid")
            .and_then(Value::as_str)
            .map(String::from),
    }
}

async fn verb(
    ctx: &Ctx,
    method: &Method,
    headers: &HeaderMap,
    q: &HashMap<String, String>,
    accept: &str,
    t: Target,
    body: Bytes,
) -> Result<Response, ApiError> {
    let state = &ctx.state;
    let ns = t.namespace.clone().unwrap_or_default();
    let rt = &t.rt;
    match (method.clone(), t.name.as_deref(), t.sub.as_deref()) {
        (Method::GET, None, None) => {
            let opts = list_opts(q)?;
            if is_true(q, "watch") {
                let params = WatchParams {
                    rt: rt.clone(),
                    namespace: t.namespace.clone(),
                    labels: opts.labels,
                    fields: opts.fields,
                    resource_version: q.get("resourceVersion").cloned().filter(|r| !r.is_empty()),
                    bookmarks: is_true(q, "allowWatchBookmarks"),
                    send_initial_events: q.get("sendInitialEvents").map(|v| v == "true"),
                    timeout: q.get("timeoutSeconds").and_then(|t| t.parse().ok()),
                    table: table::wants_table(accept),
                };
                return watch::serve(ctx, params);
            }
            let (items, rv, next) = state.list(rt, t.namespace.as_deref(), &opts)?;
            Ok(json_response(
                200,
                &list_body(rt, &items, rv, next.as_deref(), accept),
            ))
        }
        (Method::GET, Some(name), None | Some("status")) => {
            let obj = state.get(rt, &ns, name)?;
            Ok(json_response(200, &object_body(rt, &obj, accept)))
        }
        (Method::GET, Some(name), Some("log")) if rt.plural == "pods" => {
            state.get(rt, &ns, name)?;
            let bytes = ctx
                .logs
                .read(&ns, name, q.get("container").map(String::as_str))
                .unwrap_or_default();
            let text = String::from_utf8_lossy(&bytes).into_owned();
            let text = match q.get("tailLines").and_then(|n| n.parse::<usize>().ok()) {
                Some(n) => {
                    let lines: Vec<&str> = text.lines().collect();
                    let start = lines.len().saturating_sub(n);
                    let mut out = lines[start..].join("\n");
                    if !out.is_empty() {
                        out.push('\n');
                    }
                    out
                }
                None => text,
            };
            let mut resp = Response::new(Body::from(text));
            resp.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            Ok(resp)
        }
        (Method::POST, None, None) => {
            let obj = parse_body(headers, &body)?;
            let created = state.create(rt, &ns, obj)?;
            Ok(json_response(201, &created))
        }
        (Method::POST, Some(name), Some("binding")) if rt.plural == "pods" => {
            let binding = parse_body(headers, &body)?;
            let node = binding
                .pointer("/target/name")
                .and_then(Value::as_str)
                .ok_or_else(|| ApiError::bad_request("binding has no target.name"))?;
            state.bind(rt, &ns, name, node)?;
            Ok(json_response(
                201,
                &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
            ))
        }
        (Method::POST, Some(name), Some("eviction")) if rt.plural == "pods" => {
            state.delete(rt, &ns, name, &DeleteOpts::default())?;
            ctx.logs.remove_pod(&ns, name);
            Ok(json_response(
                201,
                &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
            ))
        }
        (Method::PUT, Some(name), sub @ (None | Some("status"))) => {
            let obj = parse_body(headers, &body)?;
            let part = if sub.is_some() {
                Part::Status
            } else {
                Part::Main
            };
            let out = state.update(rt, &ns, name, obj, part)?;
            Ok(json_response(200, &out))
        }
        (Method::PATCH, Some(name), sub @ (None | Some("status"))) => {
            let ct = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let kind = PatchKind::from_content_type(ct).ok_or_else(|| {
                ApiError::new(415, "UnsupportedMediaType", format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json (got {ct:?})"))
            })?;
            let patch: Value = if kind == PatchKind::Apply {
                // An apply body is YAML, but clients (kube-rs, client-go) send its JSON
                // subset, which serde_json reads several times faster than the YAML parser.
                match serde_json::from_slice(&body) {
                    Ok(v) => v,
                    Err(_) => serde_yaml::from_slice(&body)
                        .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?,
                }
            } else {
                serde_json::from_slice(&body)
                    .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?
            };
            if kind == PatchKind::Apply && q.get("fieldManager").is_none_or(String::is_empty) {
                return Err(ApiError::bad_request(
                    "PATCH requests with apply content type require a fieldManager query parameter",
                ));
            }
            let part = if sub.is_some() {
                Part::Status
            } else {
                Part::Main
            };
            let out = state.patch(rt, &ns, name, kind, &patch, part)?;
            Ok(json_response(200, &out))
        }
        (Method::DELETE, Some(name), None) => {
            let opts = delete_opts(q, &body);
            let (obj, gone) = state.delete(rt, &ns, name, &opts)?;
            let pods = rt.group.is_empty() && rt.plural == "pods";
            if gone && pods {
                ctx.logs.remove_pod(&ns, name);
            }
            // Like kube-apiserver: pods and custom resources answer with the deleted object,
            // other types with a Success status once the object is gone.
            if gone && !pods && !rt.custom {
                return Ok(json_response(
                    200,
                    &json!({
                        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                        "details": {"name": name, "group": rt.group, "kind": rt.plural,
                                    "uid": obj.pointer("/metadata/uid").cloned().unwrap_or(Value::Null)},
                    }),
                ));
            }
            Ok(json_response(200, &obj))
        }
        (Method::DELETE, None, None) => {
            let opts = list_opts(q)?;
            let del = delete_opts(q, &body);
            let (items, rv, _) = state.list(
                rt,
                t.namespace.as_deref(),
                &ListOpts {
                    limit: None,
                    continue_token: None,
                    ..opts
                },
            )?;
            let mut deleted = Vec::new();
            for item in items {
                let name = super::store::name_of(&item).to_string();
                let item_ns = super::store::namespace_of(&item).to_string();
                if let Ok((obj, _)) = state.delete(rt, &item_ns, &name, &del) {
                    deleted.push(obj);
                }
            }
            Ok(json_response(200, &list_body(rt, &deleted, rv, None, "")))
        }
        _ => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!(
                "the server does not allow this method on the requested resource ({method} {})",
                rt.plural
            ),
        )),
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error_response(&self)
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
