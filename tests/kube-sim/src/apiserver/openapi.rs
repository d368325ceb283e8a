//! A minimal OpenAPI v3 (`/openapi/v3`, `/openapi/v3/{api/v1|apis/g/v}`): enough for kubectl
//! to see that the server validates fields itself (so `kubectl apply` does not need the
//! protobuf OpenAPI v2 document), and the schemas of custom resources for `kubectl explain`.
//! Built-in types have paths but no schemas.

use serde_json::{Map, Value, json};

use super::resources::ResourceType;

fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// `/openapi/v3`: the group-versions with documents.
pub fn root(types: &[ResourceType]) -> Value {
    let mut paths = Map::new();
    for rt in types {
        let p = gv_path(&rt.group, &rt.version);
        let url = format!("/openapi/v3/{p}?hash={}", types.len());
        paths.insert(p, json!({"serverRelativeURL": url}));
    }
    json!({"paths": paths})
}

/// Schema component name, e.g. `io.loraplane.v1alpha1.LoRATrainingJob`.
fn component_name(rt: &ResourceType) -> String {
    let reversed: Vec<&str> = rt.group.split('.').rev().collect();
    let group = if rt.group.is_empty() {
        "io.k8s.api.core".to_string()
    } else {
        reversed.join(".")
    };
    format!("{group}.{}.{}", rt.version, rt.kind)
}

/// `/openapi/v3/api/v1` or `/openapi/v3/apis/{group}/{version}`, `None` when not served.
pub fn group_version(types: &[ResourceType], group: &str, version: &str) -> Option<Value> {
    let served: Vec<&ResourceType> = types
        .iter()
        .filter(|t| t.group == group && t.version == version)
        .collect();
    if served.is_empty() {
        return None;
    }
    let mut paths = Map::new();
    let mut schemas = Map::new();
    for rt in served {
        let gvk = json!({"group": rt.group, "version": rt.version, "kind": rt.kind});
        let base = format!("/{}", gv_path(&rt.group, &rt.version));
        let (collection, item) = if rt.namespaced {
            (
                format!("{base}/namespaces/{{namespace}}/{}", rt.plural),
                format!("{base}/namespaces/{{namespace}}/{}/{{name}}", rt.plural),
            )
        } else {
            (
                format!("{base}/{}", rt.plural),
                format!("{base}/{}/{{name}}", rt.plural),
            )
        };
        let params = json!([
            {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
            {"name": "fieldManager", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
            {"name": "dryRun", "in": "query", "schema": {"type": "string", "uniqueItems": true}}
        ]);
        let op = |action: &str| {
            json!({
                "x-kubernetes-action": action,
                "x-kubernetes-group-version-kind": gvk,
                "parameters": params,
                "responses": {"200": {"description": "OK"}}
            })
        };
        paths.insert(collection, json!({"post": op("post"), "get": op("list")}));
        paths.insert(
            item,
            json!({"get": op("get"), "put": op("put"), "patch": op("patch"), "delete": op("delete")}),
        );
        if let Some(schema) = &rt.schema {
            let mut s = schema.raw().clone();
            if let Value::Object(m) = &mut s {
                m.insert("x-kubernetes-group-version-kind".into(), json!([gvk]));
                let props = m.entry("properties").or_insert_with(|| json!({}));
                if let Value::Object(props) = props {
                    props.entry("apiVersion").or_insert(json!({"type": "string", "description": "APIVersion defines the versioned schema of this representation of an object."}));
                    props.entry("kind").or_insert(json!({"type": "string", "description": "Kind is a string value representing the REST resource this object represents."}));
                    props.entry("metadata").or_insert(
                        json!({"type": "object", "description": "Standard object's metadata."}),
                    );
                }
            }
            schemas.insert(component_name(rt), s);
        }
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.33.0-kube-sim"},
        "paths": paths,
        "components": {"schemas": schemas},
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crd_documents_have_patch_with_field_validation_and_the_schema() {
        let crd: Value =
            serde_yaml::from_str(include_str!("../../../../crds/loratrainingjob.yaml")).unwrap();
        let types = super::super::resources::from_crd(&crd).unwrap();
        let r = root(&types);
        assert!(r["paths"]["apis/loraplane.io/v1alpha1"]["serverRelativeURL"].is_string());
        let doc = group_version(&types, "loraplane.io", "v1alpha1").unwrap();
        let patch = &doc["paths"]["/apis/loraplane.io/v1alpha1/namespaces/{namespace}/loratrainingjobs/{name}"]
            ["patch"];
        assert_eq!(
            patch["x-kubernetes-group-version-kind"]["kind"],
            "LoRATrainingJob"
        );
        assert_eq!(patch["parameters"][0]["name"], "fieldValidation");
        assert!(doc["components"]["schemas"]["io.loraplane.v1alpha1.LoRATrainingJob"]["properties"]["spec"].is_object());
    }
}
