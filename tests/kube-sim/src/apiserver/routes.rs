//! Every endpoint kube-sim serves, in one table ([`ROUTES`]), the matcher that picks a row
//! for a request path, and the common steps of resource requests (resolving the type,
//! checking the scope, the audit record, reading the body) before a handler runs.

use axum::body::Body;
use axum::extract::Request;
use axum::http::request::Parts;
use axum::http::{Method, header};
use axum::response::Response;

use super::audit::Call;
use super::handlers as h;
use super::meta::ApiError;
use super::request::{
    Ctx, MAX_BODY, Params, Req, header_str, is_true, parse_query, percent_decode,
};

/// A handler of a server path (version, health, discovery): `None` answers 404.
type ServerHandler = fn(&Ctx, &Params) -> Option<Response>;
/// A handler of a resource path.
type ResourceHandler = fn(&Ctx, &Req) -> Result<Response, ApiError>;

/// What answers the requests to one path pattern.
enum Methods {
    /// GET only; other methods get 404 (the path is not a resource).
    Server(ServerHandler),
    /// A handler per method; other methods get 405 MethodNotAllowed, like kube-apiserver.
    Resource(&'static [(Method, ResourceHandler)]),
}

/// One row of the table: a path pattern and what answers it.
struct Route {
    /// Segments are literals, `{field}` (captures any segment) or `{field:a|b}` (captures
    /// only these values); see [`Params`] for the fields.
    pattern: &'static str,
    methods: Methods,
}

const fn server(pattern: &'static str, handler: ServerHandler) -> Route {
    Route {
        pattern,
        methods: Methods::Server(handler),
    }
}

const fn resource(pattern: &'static str, methods: &'static [(Method, ResourceHandler)]) -> Route {
    Route {
        pattern,
        methods: Methods::Resource(methods),
    }
}

/// A collection: list (or watch with `?watch=true`), create, delete the selected items.
const COLLECTION: &[(Method, ResourceHandler)] = &[
    (Method::GET, h::list_or_watch),
    (Method::POST, h::create),
    (Method::DELETE, h::delete_collection),
];
/// One object.
const OBJECT: &[(Method, ResourceHandler)] = &[
    (Method::GET, h::get),
    (Method::PUT, h::replace),
    (Method::PATCH, h::patch),
    (Method::DELETE, h::delete),
];
/// The `status` subresource: writes change only the status.
const STATUS: &[(Method, ResourceHandler)] = &[
    (Method::GET, h::get),
    (Method::PUT, h::replace),
    (Method::PATCH, h::patch),
];
const POD_LOG: &[(Method, ResourceHandler)] = &[(Method::GET, h::pod_log)];
const POD_BINDING: &[(Method, ResourceHandler)] = &[(Method::POST, h::pod_binding)];
const POD_EVICTION: &[(Method, ResourceHandler)] = &[(Method::POST, h::pod_eviction)];
/// A subresource kube-sim knows the path of but does not implement: every method gets 405.
const NONE: &[(Method, ResourceHandler)] = &[];

/// Every endpoint. The first row whose pattern fits the path decides, whatever the method
/// (so a method that row lacks gets 404 or 405, it does not fall through to a later row).
/// The core group lives under `/api/{version}`, the others under `/apis/{group}/{version}`;
/// `{resource}` alone is a cluster-scoped type, or every namespace of a namespaced one.
#[rustfmt::skip] // One row a line, so that the table reads as the list of endpoints.
static ROUTES: &[Route] = &[
    // Version, health, discovery, OpenAPI.
    server("/version", h::version),
    server("/healthz", h::health),
    server("/readyz", h::health),
    server("/livez", h::health),
    server("/api", h::core_versions),
    server("/apis", h::group_list),
    server("/api/{version}", h::resource_list),
    server("/apis/{group}", h::group),
    server("/apis/{group}/{version}", h::resource_list),
    server("/openapi/v3", h::openapi_root),
    server("/openapi/v3/api/{version}", h::openapi_group_version),
    server("/openapi/v3/apis/{group}/{version}", h::openapi_group_version),
    // The core group. A namespace's own subresources come before the namespaced
    // collections, whose pattern they also fit.
    resource("/api/{version}/{resource}", COLLECTION),
    resource("/api/{version}/{resource:namespaces}/{name}/{subresource:status}", STATUS),
    resource("/api/{version}/{resource:namespaces}/{name}/{subresource:finalize}", NONE),
    resource("/api/{version}/namespaces/{namespace}/{resource}", COLLECTION),
    resource("/api/{version}/namespaces/{namespace}/{resource}/{name}", OBJECT),
    resource("/api/{version}/namespaces/{namespace}/{resource}/{name}/{subresource:status}", STATUS),
    resource("/api/{version}/namespaces/{namespace}/{resource:pods}/{name}/{subresource:log}", POD_LOG),
    resource("/api/{version}/namespaces/{namespace}/{resource:pods}/{name}/{subresource:binding}", POD_BINDING),
    resource("/api/{version}/namespaces/{namespace}/{resource:pods}/{name}/{subresource:eviction}", POD_EVICTION),
    resource("/api/{version}/namespaces/{namespace}/{resource}/{name}/{subresource}", NONE),
    resource("/api/{version}/{resource}/{name}", OBJECT),
    resource("/api/{version}/{resource}/{name}/{subresource:status}", STATUS),
    resource("/api/{version}/{resource}/{name}/{subresource}", NONE),
    // Named groups (built-in and custom resources).
    resource("/apis/{group}/{version}/{resource}", COLLECTION),
    resource("/apis/{group}/{version}/namespaces/{namespace}/{resource}", COLLECTION),
    resource("/apis/{group}/{version}/namespaces/{namespace}/{resource}/{name}", OBJECT),
    resource("/apis/{group}/{version}/namespaces/{namespace}/{resource}/{name}/{subresource:status}", STATUS),
    resource("/apis/{group}/{version}/namespaces/{namespace}/{resource:pods}/{name}/{subresource:log}", POD_LOG),
    resource("/apis/{group}/{version}/namespaces/{namespace}/{resource:pods}/{name}/{subresource:binding}", POD_BINDING),
    resource("/apis/{group}/{version}/namespaces/{namespace}/{resource:pods}/{name}/{subresource:eviction}", POD_EVICTION),
    resource("/apis/{group}/{version}/namespaces/{namespace}/{resource}/{name}/{subresource}", NONE),
    resource("/apis/{group}/{version}/{resource}/{name}", OBJECT),
    resource("/apis/{group}/{version}/{resource}/{name}/{subresource:status}", STATUS),
    resource("/apis/{group}/{version}/{resource}/{name}/{subresource}", NONE),
];

/// The captures of `segs` (a path split at `/`) under `pattern`, if it fits.
fn capture(pattern: &str, segs: &[&str]) -> Option<Params> {
    let parts: Vec<&str> = pattern.split('/').filter(|p| !p.is_empty()).collect();
    if parts.len() != segs.len() {
        return None;
    }
    let mut params = Params::default();
    for (part, seg) in parts.iter().zip(segs) {
        match part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
            None if part == seg => {}
            None => return None,
            Some(field) => {
                let (field, allowed) = match field.split_once(':') {
                    Some((field, allowed)) => (field, Some(allowed)),
                    None => (field, None),
                };
                if allowed.is_some_and(|a| !a.split('|').any(|v| v == *seg)) {
                    return None;
                }
                params.set(field, seg)?;
            }
        }
    }
    Some(params)
}

/// The first row that fits the path, and its captures.
fn find(segs: &[&str]) -> Option<(&'static Route, Params)> {
    ROUTES
        .iter()
        .find_map(|r| capture(r.pattern, segs).map(|p| (r, p)))
}

/// Answers a request from the row its path fits.
pub(super) async fn dispatch(ctx: &Ctx, req: Request) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let segs: Vec<String> = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(percent_decode)
        .collect();
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let (route, params) = find(&segs).ok_or_else(|| ApiError::no_route(&path))?;
    match route.methods {
        Methods::Server(handler) if parts.method == Method::GET => {
            handler(ctx, &params).ok_or_else(|| ApiError::no_route(&path))
        }
        Methods::Server(_) => Err(ApiError::no_route(&path)),
        Methods::Resource(methods) => {
            let req = resource_request(ctx, parts, body, params).await?;
            let handler = methods
                .iter()
                .find(|(m, _)| *m == req.method)
                .map(|(_, handler)| *handler)
                .ok_or_else(|| {
                    ApiError::new(
                        405,
                        "MethodNotAllowed",
                        format!(
                            "the server does not allow this method on the requested resource ({} {})",
                            req.method, req.rt.plural
                        ),
                    )
                })?;
            handler(ctx, &req)
        }
    }
}

/// Resolves the type (404 when unknown or addressed in the wrong scope), records the request
/// in the audit log, and reads the body.
async fn resource_request(ctx: &Ctx, parts: Parts, body: Body, p: Params) -> Result<Req, ApiError> {
    let path = parts.uri.path();
    let rt = ctx
        .state
        .resolve(&p.group, &p.version, &p.resource)
        .ok_or_else(|| ApiError::no_route(path))?;
    // A namespaced type is listed (GET) or collection-deleted across all namespaces without
    // one; anything else must be addressed in its own scope.
    if rt.namespaced != p.namespace.is_some()
        && (p.name.is_some() || parts.method != Method::GET && parts.method != Method::DELETE)
    {
        return Err(ApiError::no_route(path));
    }
    if !rt.namespaced && p.namespace.is_some() {
        return Err(ApiError::no_route(path));
    }
    let query = parse_query(parts.uri.query());
    // kube-apiserver authorizes a server-side apply that creates the object as `create` too.
    let apply_creates = ctx.audit.is_enabled()
        && parts.method == Method::PATCH
        && header_str(&parts.headers, header::CONTENT_TYPE)
            .is_some_and(|ct| ct.starts_with("application/apply-patch"))
        && p.name.as_deref().is_some_and(|name| {
            ctx.state
                .get(&rt, p.namespace.as_deref().unwrap_or_default(), name)
                .is_err()
        });
    ctx.audit.record(Call {
        apply_creates,
        method: &parts.method,
        user_agent: header_str(&parts.headers, header::USER_AGENT),
        watch: is_true(&query, "watch"),
        group: &p.group,
        resource: &rt.plural,
        subresource: p.subresource.as_deref(),
        namespace: p.namespace.as_deref(),
        name: p.name.as_deref(),
    });
    let accept = header_str(&parts.headers, header::ACCEPT)
        .unwrap_or("")
        .to_string();
    let body = axum::body::to_bytes(body, MAX_BODY)
        .await
        .map_err(|e| ApiError::bad_request(format!("reading the request body: {e}")))?;
    Ok(Req {
        rt,
        namespace: p.namespace,
        name: p.name,
        subresource: p.subresource,
        method: parts.method,
        query,
        headers: parts.headers,
        accept,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route_of(path: &str) -> Option<(&'static str, Params)> {
        let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        find(&segs).map(|(r, p)| (r.pattern, p))
    }

    #[test]
    fn every_pattern_captures_known_fields() {
        for r in ROUTES {
            // A path the pattern must fit: each capture replaced by its first allowed value.
            let path: Vec<&str> = r
                .pattern
                .split('/')
                .filter(|p| !p.is_empty())
                .map(
                    |part| match part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
                        Some(field) => field
                            .split_once(':')
                            .map_or("x", |(_, allowed)| allowed.split('|').next().unwrap_or("x")),
                        None => part,
                    },
                )
                .collect();
            assert!(capture(r.pattern, &path).is_some(), "{}", r.pattern);
        }
    }

    #[test]
    fn paths_pick_the_expected_rows() {
        let (pattern, p) = route_of("/api/v1/namespaces/ns/pods/p/log").unwrap();
        assert_eq!(
            pattern,
            "/api/{version}/namespaces/{namespace}/{resource:pods}/{name}/{subresource:log}"
        );
        assert_eq!(
            p,
            Params {
                group: String::new(),
                version: "v1".into(),
                namespace: Some("ns".into()),
                resource: "pods".into(),
                name: Some("p".into()),
                subresource: Some("log".into()),
            }
        );
        // A namespace's status, not a type named `status` in namespace `x`.
        let (_, p) = route_of("/api/v1/namespaces/x/status").unwrap();
        assert_eq!(
            (p.resource.as_str(), p.name.as_deref()),
            ("namespaces", Some("x"))
        );
        assert_eq!(p.namespace, None);
        // In a named group the same shape is a namespaced collection.
        let (_, p) = route_of("/apis/g/v1/namespaces/x/status").unwrap();
        assert_eq!(
            (p.resource.as_str(), p.namespace.as_deref()),
            ("status", Some("x"))
        );
        let (pattern, _) = route_of("/api/v1/nodes/n/proxy").unwrap();
        assert_eq!(pattern, "/api/{version}/{resource}/{name}/{subresource}");
        let (pattern, p) = route_of("/apis/loraplane.io/v1alpha1/loratrainingjobs").unwrap();
        assert_eq!(pattern, "/apis/{group}/{version}/{resource}");
        assert_eq!(p.group, "loraplane.io");
        assert!(route_of("/api/v1/a/b/c/d").is_none());
        assert!(route_of("/nope").is_none());
    }
}
