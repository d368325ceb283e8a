//! The PATCH bodies the apiserver accepts: JSON merge patch (RFC 7386), JSON patch (RFC 6902),
//! strategic merge patch (approximated: merge patch plus merging of known keyed lists) and
//! server-side apply (approximated as a strategic merge of the applied configuration).

use serde_json::{Map, Value};

/// Which patch format a request body is in, from its `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchKind {
    /// `application/merge-patch+json`
    Merge,
    /// `application/json-patch+json`
    Json,
    /// `application/strategic-merge-patch+json`
    Strategic,
    /// `application/apply-patch+yaml`
    Apply,
}

impl PatchKind {
    /// Recognises a patch content type.
    pub fn from_content_type(ct: &str) -> Option<PatchKind> {
        let ct = ct.split(';').next().unwrap_or("").trim();
        match ct {
            "application/merge-patch+json" => Some(PatchKind::Merge),
            "application/json-patch+json" => Some(PatchKind::Json),
            "application/strategic-merge-patch+json" => Some(PatchKind::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+json" => {
                Some(PatchKind::Apply)
            }
            _ => None,
        }
    }
}

/// RFC 7386: objects merge recursively, `null` removes, everything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch_map) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(target_map) = target {
        for (k, v) in patch_map {
            if v.is_null() {
                target_map.remove(k);
            } else {
                merge_patch(target_map.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

/// The merge key of a list field in Kubernetes' strategic merge patch, for the fields our
/// components and kubectl touch; other lists are replaced whole.
fn merge_key(field: &str) -> Option<&'static str> {
    match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "volumes"
        | "env"
        | "volumeMounts"
        | "imagePullSecrets"
        | "containerStatuses"
        | "initContainerStatuses" => Some("name"),
        "conditions" => Some("type"),
        "ownerReferences" => Some("uid"),
        "ports" => Some("containerPort"),
        "addresses" => Some("type"),
        _ => None,
    }
}

/// Lists of scalars that strategic merge treats as sets to union.
fn is_merged_scalar_list(field: &str) -> bool {
    field == "finalizers"
}

/// Strategic merge patch, approximated: like a merge patch, but keyed lists merge element-wise
/// (`$patch: delete` removes an element), `finalizers` union, and the `$setElementOrder`,
/// `$retainKeys` and `$deleteFromPrimitiveList` directives kubectl sends are honoured loosely.
pub fn strategic_merge(target: &mut Value, patch: &Value) {
    let Value::Object(patch_map) = patch else {
        *target = patch.clone();
        return;
    };
    if patch_map.get("$patch").and_then(Value::as_str) == Some("replace") {
        let mut replaced = patch.clone();
        if let Value::Object(m) = &mut replaced {
            m.remove("$patch");
        }
        *target = replaced;
        return;
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(target_map) = target else {
        return;
    };
    for (k, v) in patch_map {
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(have)), Value::Array(drop)) = (target_map.get_mut(field), v) {
                have.retain(|x| !drop.contains(x));
            }
            continue;
        }
        if k.starts_with('$') {
            continue;
        }
        if v.is_null() {
            target_map.remove(k);
            continue;
        }
        match (v, merge_key(k)) {
            (Value::Array(items), Some(key)) if items.iter().all(Value::is_object) => {
                let existing = target_map
                    .entry(k.clone())
                    .or_insert_with(|| Value::Array(Vec::new()));
                if !existing.is_array() {
                    *existing = Value::Array(Vec::new());
                }
                if let Value::Array(list) = existing {
                    merge_keyed_list(list, items, key);
                }
            }
            (Value::Array(items), None) if is_merged_scalar_list(k) => {
                let existing = target_map
                    .entry(k.clone())
                    .or_insert_with(|| Value::Array(Vec::new()));
                if let Value::Array(list) = existing {
                    for item in items {
                        if !list.contains(item) {
                            list.push(item.clone());
                        }
                    }
                } else {
                    *existing = v.clone();
                }
            }
            (Value::Object(_), _) => {
                strategic_merge(target_map.entry(k.clone()).or_insert(Value::Null), v);
            }
            _ => {
                target_map.insert(k.clone(), v.clone());
            }
        }
    }
}

fn merge_keyed_list(list: &mut Vec<Value>, items: &[Value], key: &str) {
    for item in items {
        let id = item.get(key).cloned();
        let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
        let pos = id
            .as_ref()
            .and_then(|id| list.iter().position(|e| e.get(key) == Some(id)));
        match (pos, delete) {
            (Some(i), true) => {
                list.remove(i);
            }
            (None, true) => {}
            (Some(i), false) => strategic_merge(&mut list[i], item),
            (None, false) => {
                let mut fresh = Value::Object(Map::new());
                strategic_merge(&mut fresh, item);
                list.push(fresh);
            }
        }
    }
}

/// Errors of applying a JSON patch.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum JsonPatchError {
    /// The body is not a list of operations.
    #[error("the patch is not a JSON patch document: {0}")]
    ParseOperation(String),
    /// An operation refers to a path that does not exist.
    #[error("doc is missing path: {0}")]
    ResolvePath(String),
    /// A `test` operation failed.
    #[error("testing value {0} failed")]
    TestValue(String),
}

fn unescape(token: &str) -> String {
    token.replace("~1", "/").replace("~0", "~")
}

fn split_pointer(path: &str) -> Result<(String, String), JsonPatchError> {
    let idx = path
        .rfind('/')
        .ok_or_else(|| JsonPatchError::ResolvePath(path.to_string()))?;
    Ok((path[..idx].to_string(), unescape(&path[idx + 1..])))
}

fn remove_at(doc: &mut Value, path: &str) -> Result<Value, JsonPatchError> {
    let (parent, last) = split_pointer(path)?;
    let missing = || JsonPatchError::ResolvePath(path.to_string());
    match doc.pointer_mut(&parent).ok_or_else(missing)? {
        Value::Object(m) => m.remove(&last).ok_or_else(missing),
        Value::Array(a) => {
            let i: usize = last.parse().map_err(|_| missing())?;
            if i < a.len() {
                Ok(a.remove(i))
            } else {
                Err(missing())
            }
        }
        _ => Err(missing()),
    }
}

fn add_at(doc: &mut Value, path: &str, value: Value) -> Result<(), JsonPatchError> {
    if path.is_empty() {
        *doc = value;
        return Ok(());
    }
    let (parent, last) = split_pointer(path)?;
    let missing = || JsonPatchError::ResolvePath(path.to_string());
    match doc.pointer_mut(&parent).ok_or_else(missing)? {
        Value::Object(m) => {
            m.insert(last, value);
            Ok(())
        }
        Value::Array(a) => {
            if last == "-" {
                a.push(value);
                return Ok(());
            }
            let i: usize = last.parse().map_err(|_| missing())?;
            if i <= a.len() {
                a.insert(i, value);
                Ok(())
            } else {
                Err(missing())
            }
        }
        _ => Err(missing()),
    }
}

/// RFC 6902 JSON patch.
pub fn json_patch(doc: &mut Value, patch: &Value) -> Result<(), JsonPatchError> {
    let ops = patch
        .as_array()
        .ok_or_else(|| JsonPatchError::ParseOperation("expected a list".to_string()))?;
    for op in ops {
        let kind = op.get("op").and_then(Value::as_str).unwrap_or_default();
        let path = op
            .get("path")
            .and_then(Value::as_str)
            .ok_or_else(|| JsonPatchError::ParseOperation(format!("no path in {op}")))?;
        let value = || {
            op.get("value")
                .cloned()
                .ok_or_else(|| JsonPatchError::ParseOperation(format!("no value in {op}")))
        };
        let from = || {
            op.get("from")
                .and_then(Value::as_str)
                .ok_or_else(|| JsonPatchError::ParseOperation(format!("no from in {op}")))
        };
        match kind {
            "add" => add_at(doc, path, value()?)?,
            "remove" => {
                remove_at(doc, path)?;
            }
            "replace" => {
                if doc.pointer(path).is_none() {
                    return Err(JsonPatchError::ResolvePath(path.to_string()));
                }
                if let Some(slot) = doc.pointer_mut(path) {
                    *slot = value()?;
                }
            }
            "move" => {
                let v = remove_at(doc, from()?)?;
                add_at(doc, path, v)?;
            }
            "copy" => {
                let v = doc
                    .pointer(from()?)
                    .cloned()
                    .ok_or_else(|| JsonPatchError::ResolvePath(path.to_string()))?;
                add_at(doc, path, v)?;
            }
            "test" => {
                if doc.pointer(path) != Some(&value()?) {
                    return Err(JsonPatchError::TestValue(path.to_string()));
                }
            }
            other => {
                return Err(JsonPatchError::ParseOperation(format!(
                    "unknown operation {other:?}"
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_removes_nulls_and_replaces_lists() {
        let mut doc = json!({"a": {"b": 1, "c": 2}, "l": [1, 2]});
        merge_patch(&mut doc, &json!({"a": {"b": null, "d": 3}, "l": [3]}));
        assert_eq!(doc, json!({"a": {"c": 2, "d": 3}, "l": [3]}));
    }

    #[test]
    fn strategic_merge_merges_containers_and_conditions_by_key() {
        let mut doc = json!({"spec": {"containers": [{"name": "a", "image": "x"}, {"name": "b", "image": "y"}]},
                             "status": {"conditions": [{"type": "Ready", "status": "False"}]},
                             "metadata": {"finalizers": ["f1"]}});
        strategic_merge(
            &mut doc,
            &json!({"spec": {"containers": [{"name": "b", "image": "z"}, {"name": "a", "$patch": "delete"}]},
                    "status": {"conditions": [{"type": "PodScheduled", "status": "True"}]},
                    "metadata": {"finalizers": ["f2"], "$setElementOrder/finalizers": ["f1", "f2"]}}),
        );
        assert_eq!(
            doc["spec"]["containers"],
            json!([{"name": "b", "image": "z"}])
        );
        assert_eq!(doc["status"]["conditions"].as_array().unwrap().len(), 2);
        assert_eq!(doc["metadata"]["finalizers"], json!(["f1", "f2"]));
        assert!(doc["metadata"].get("$setElementOrder/finalizers").is_none());
    }

    #[test]
    fn json_patch_operations() {
        let mut doc = json!({"a": [1, 2], "b": {"c": "x"}});
        json_patch(
            &mut doc,
            &json!([
                {"op": "add", "path": "/a/-", "value": 3},
                {"op": "replace", "path": "/b/c", "value": "y"},
                {"op": "test", "path": "/b/c", "value": "y"},
                {"op": "copy", "from": "/b", "path": "/d"},
                {"op": "remove", "path": "/a/0"},
                {"op": "move", "from": "/d/c", "path": "/e"}
            ]),
        )
        .unwrap();
        assert_eq!(
            doc,
            json!({"a": [2, 3], "b": {"c": "y"}, "d": {}, "e": "y"})
        );
        let err = json_patch(
            &mut doc,
            &json!([{"op": "test", "path": "/e", "value": "n"}]),
        );
        assert!(err.is_err());
        let err = json_patch(
            &mut doc,
            &json!([{"op": "replace", "path": "/nope", "value": 1}]),
        );
        assert!(err.is_err());
    }
}
