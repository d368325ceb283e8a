//! The handlers the route table (`routes`) points at: version, health and discovery, and the
//! verbs on resources (list/watch, get, create, replace, patch, delete, delete a collection,
//! and the pod subresources `log`, `binding`, `eviction`), each turning a request into calls
//! on the store and the result into JSON.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use serde_json::{Value, json};

use super::meta::ApiError;
use super::ops::{DeleteOpts, ListOpts, Part};
use super::patch::PatchKind;
use super::request::{Ctx, Params, Req, header_str, is_true, json_response, parse_body};
use super::resources::{self, ResourceType};
use super::selectors::{FieldSelector, LabelSelector};
use super::store::{name_of, namespace_of};
use super::watch::{self, WatchParams};
use super::{openapi, table};

// Server paths.

pub(super) fn version(_: &Ctx, _: &Params) -> Option<Response> {
    Some(json_response(
        200,
        &json!({
            "major": "1", "minor": "33", "gitVersion": "v1.33.0-kube-sim", "gitCommit": "kube-sim",
            "gitTreeState": "clean", "buildDate": "2025-01-01T00:00:00Z", "goVersion": "n/a",
            "compiler": "rustc", "platform": "linux/amd64"
        }),
    ))
}

pub(super) fn health(_: &Ctx, _: &Params) -> Option<Response> {
    Some(Response::new(Body::from("ok")))
}

pub(super) fn core_versions(_: &Ctx, _: &Params) -> Option<Response> {
    Some(json_response(200, &resources::core_versions()))
}

pub(super) fn group_list(ctx: &Ctx, _: &Params) -> Option<Response> {
    Some(json_response(
        200,
        &resources::group_list(&ctx.state.types()),
    ))
}

/// The resources of a group-version (`/api/{version}`, `/apis/{group}/{version}`).
pub(super) fn resource_list(ctx: &Ctx, p: &Params) -> Option<Response> {
    resources::resource_list(&ctx.state.types(), &p.group, &p.version)
        .map(|l| json_response(200, &l))
}

pub(super) fn group(ctx: &Ctx, p: &Params) -> Option<Response> {
    resources::group(&ctx.state.types(), &p.group).map(|l| json_response(200, &l))
}

pub(super) fn openapi_root(ctx: &Ctx, _: &Params) -> Option<Response> {
    Some(json_response(200, &openapi::root(&ctx.state.types())))
}

pub(super) fn openapi_group_version(ctx: &Ctx, p: &Params) -> Option<Response> {
    openapi::group_version(&ctx.state.types(), &p.group, &p.version).map(|d| json_response(200, &d))
}

// Resources.

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

/// Which part of the object a write may change: the status through `/status`.
fn part(r: &Req) -> Part {
    if r.subresource.is_some() {
        Part::Status
    } else {
        Part::Main
    }
}

fn success(code: u16) -> Response {
    json_response(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": code}),
    )
}

pub(super) fn list_or_watch(ctx: &Ctx, r: &Req) -> Result<Response, ApiError> {
    let q = &r.query;
    let opts = list_opts(q)?;
    if is_true(q, "watch") {
        let params = WatchParams {
            rt: r.rt.clone(),
            namespace: r.namespace.clone(),
            labels: opts.labels,
            fields: opts.fields,
            resource_version: q.get("resourceVersion").cloned().filter(|v| !v.is_empty()),
            bookmarks: is_true(q, "allowWatchBookmarks"),
            send_initial_events: q.get("sendInitialEvents").map(|v| v == "true"),
            timeout: q.get("timeoutSeconds").and_then(|t| t.parse().ok()),
            table: table::wants_table(&r.accept),
        };
        return watch::serve(&ctx.state, ctx.faults.bookmark_interval(), params);
    }
    let (items, rv, next) = ctx.state.list(&r.rt, r.namespace.as_deref(), &opts)?;
    Ok(json_response(
        200,
        &list_body(&r.rt, &items, rv, next.as_deref(), &r.accept),
    ))
}

pub(super) fn get(ctx: &Ctx, r: &Req) -> Result<Response, ApiError> {
    let obj = ctx.state.get(&r.rt, r.ns(), r.name())?;
    Ok(json_response(200, &object_body(&r.rt, &obj, &r.accept)))
}

pub(super) fn create(ctx: &Ctx, r: &Req) -> Result<Response, ApiError> {
    let obj = parse_body(&r.headers, &r.body)?;
    let created = ctx.state.create(&r.rt, r.ns(), obj)?;
    Ok(json_response(201, &created))
}

pub(super) fn replace(ctx: &Ctx, r: &Req) -> Result<Response, ApiError> {
    let obj = parse_body(&r.headers, &r.body)?;
    let out = ctx.state.update(&r.rt, r.ns(), r.name(), obj, part(r))?;
    Ok(json_response(200, &out))
}

pub(super) fn patch(ctx: &Ctx, r: &Req) -> Result<Response, ApiError> {
    let ct = header_str(&r.headers, header::CONTENT_TYPE).unwrap_or("");
    let kind = PatchKind::from_content_type(ct).ok_or_else(|| {
        ApiError::new(415, "UnsupportedMediaType", format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json (got {ct:?})"))
    })?;
    let patch: Value = if kind == PatchKind::Apply {
        // An apply body is YAML, but clients (kube-rs, client-go) send its JSON subset, which
        // serde_json reads several times faster than the YAML parser.
        match serde_json::from_slice(&r.body) {
            Ok(v) => v,
            Err(_) => serde_yaml::from_slice(&r.body)
                .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?,
        }
    } else {
        serde_json::from_slice(&r.body)
            .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?
    };
    if kind == PatchKind::Apply && r.query.get("fieldManager").is_none_or(String::is_empty) {
        return Err(ApiError::bad_request(
            "PATCH requests with apply content type require a fieldManager query parameter",
        ));
    }
    let out = ctx
        .state
        .patch(&r.rt, r.ns(), r.name(), kind, &patch, part(r))?;
    Ok(json_response(200, &out))
}

pub(super) fn delete(ctx: &Ctx, r: &Req) -> Result<Response, ApiError> {
    let (rt, ns, name) = (&r.rt, r.ns(), r.name());
    let opts = delete_opts(&r.query, &r.body);
    let (obj, gone) = ctx.state.delete(rt, ns, name, &opts)?;
    let pods = rt.group.is_empty() && rt.plural == "pods";
    if gone && pods {
        ctx.logs.remove_pod(ns, name);
    }
    // Like kube-apiserver: pods and custom resources answer with the deleted object, other
    // types with a Success status once the object is gone.
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

pub(super) fn delete_collection(ctx: &Ctx, r: &Req) -> Result<Response, ApiError> {
    let opts = list_opts(&r.query)?;
    let del = delete_opts(&r.query, &r.body);
    let (items, rv, _) = ctx.state.list(
        &r.rt,
        r.namespace.as_deref(),
        &ListOpts {
            limit: None,
            continue_token: None,
            ..opts
        },
    )?;
    let mut deleted = Vec::new();
    for item in items {
        let name = name_of(&item).to_string();
        let item_ns = namespace_of(&item).to_string();
        if let Ok((obj, _)) = ctx.state.delete(&r.rt, &item_ns, &name, &del) {
            deleted.push(obj);
        }
    }
    Ok(json_response(
        200,
        &list_body(&r.rt, &deleted, rv, None, ""),
    ))
}

pub(super) fn pod_log(ctx: &Ctx, r: &Req) -> Result<Response, ApiError> {
    let (ns, name) = (r.ns(), r.name());
    ctx.state.get(&r.rt, ns, name)?;
    let bytes = ctx
        .logs
        .read(ns, name, r.query.get("container").map(String::as_str))
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let text = match r
        .query
        .get("tailLines")
        .and_then(|n| n.parse::<usize>().ok())
    {
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

pub(super) fn pod_binding(ctx: &Ctx, r: &Req) -> Result<Response, ApiError> {
    let binding = parse_body(&r.headers, &r.body)?;
    let node = binding
        .pointer("/target/name")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::bad_request("binding has no target.name"))?;
    ctx.state.bind(&r.rt, r.ns(), r.name(), node)?;
    Ok(success(201))
}

pub(super) fn pod_eviction(ctx: &Ctx, r: &Req) -> Result<Response, ApiError> {
    ctx.state
        .delete(&r.rt, r.ns(), r.name(), &DeleteOpts::default())?;
    ctx.logs.remove_pod(r.ns(), r.name());
    Ok(success(201))
}
