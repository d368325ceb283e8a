//! Server-side printing: the `meta.k8s.io/v1` `Table` that `kubectl get` asks for, with the
//! columns kube-apiserver prints for pods, nodes and PVCs, a CRD's `additionalPrinterColumns`,
//! and NAME/AGE for everything else.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use super::meta::parse_rfc3339;
use super::resources::ResourceType;

/// Whether an `Accept` header asks for a Table.
pub fn wants_table(accept: &str) -> bool {
    accept.contains("as=Table")
}

fn column(name: &str, ty: &str, priority: i64) -> Value {
    json!({"name": name, "type": ty, "format": if name == "Name" { "name" } else { "" }, "description": "", "priority": priority})
}

/// Human age like kubectl prints it (`5s`, `3m`, `2h`, `4d`).
pub fn age(timestamp: &str) -> String {
    let Some(then) = parse_rfc3339(timestamp) else {
        return "<unknown>".to_string();
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(then);
    let s = now.saturating_sub(then);
    match s {
        0..120 => format!("{s}s"),
        120..7200 => format!("{}m", s / 60),
        7200..172_800 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// Evaluates the simple JSONPath (`.a.b[0].c`) of a printer column.
pub fn json_path<'a>(obj: &'a Value, path: &str) -> Option<&'a Value> {
    let mut cur = obj;
    for part in path.trim_start_matches('.').split('.') {
        if part.is_empty() {
            continue;
        }
        let (field, index) = match part.split_once('[') {
            Some((f, rest)) => (f, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (part, None),
        };
        if !field.is_empty() {
            cur = cur.get(field)?;
        }
        if let Some(i) = index {
            cur = cur.get(i)?;
        }
    }
    Some(cur)
}

fn cell(v: Option<&Value>, ty: &str) -> Value {
    match v {
        None | Some(Value::Null) => Value::Null,
        Some(Value::String(s)) if ty == "date" => json!(age(s)),
        Some(Value::String(s)) => json!(s),
        Some(Value::Number(n)) => json!(n),
        Some(Value::Bool(b)) => json!(b),
        Some(other) => json!(other.to_string()),
    }
}

fn str_at<'a>(obj: &'a Value, ptr: &str) -> &'a str {
    obj.pointer(ptr).and_then(Value::as_str).unwrap_or("")
}

fn pod_cells(p: &Value) -> Vec<Value> {
    let containers = p
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    let statuses = p
        .pointer("/status/containerStatuses")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let ready = statuses
        .iter()
        .filter(|s| s.get("ready").and_then(Value::as_bool) == Some(true))
        .count();
    let restarts: i64 = statuses
        .iter()
        .filter_map(|s| s.get("restartCount").and_then(Value::as_i64))
        .sum();
    let mut status = str_at(p, "/status/phase").to_string();
    for s in &statuses {
        if let Some(reason) = s
            .pointer("/state/waiting/reason")
            .or_else(|| s.pointer("/state/terminated/reason"))
            .and_then(Value::as_str)
        {
            status = reason.to_string();
        }
    }
    if !str_at(p, "/status/reason").is_empty() {
        status = str_at(p, "/status/reason").to_string();
    }
    if p.pointer("/metadata/deletionTimestamp").is_some() {
        status = "Terminating".to_string();
    }
    let node = str_at(p, "/spec/nodeName");
    let ip = str_at(p, "/status/podIP");
    vec![
        json!(str_at(p, "/metadata/name")),
        json!(format!("{ready}/{containers}")),
        json!(status),
        json!(restarts),
        json!(age(str_at(p, "/metadata/creationTimestamp"))),
        json!(if ip.is_empty() { "<none>" } else { ip }),
        json!(if node.is_empty() { "<none>" } else { node }),
    ]
}

fn node_cells(n: &Value) -> Vec<Value> {
    let ready = n
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .and_then(|cs| {
            cs.iter()
                .find(|c| c.get("type").and_then(Value::as_str) == Some("Ready"))
        })
        .map(|c| c.get("status").and_then(Value::as_str) == Some("True"));
    let mut status = match ready {
        Some(true) => "Ready".to_string(),
        Some(false) => "NotReady".to_string(),
        None => "Unknown".to_string(),
    };
    if n.pointer("/spec/unschedulable").and_then(Value::as_bool) == Some(true) {
        status.push_str(",SchedulingDisabled");
    }
    let roles: Vec<String> = n
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
        .map(|l| {
            l.keys()
                .filter_map(|k| k.strip_prefix("node-role.kubernetes.io/"))
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    vec![
        json!(str_at(n, "/metadata/name")),
        json!(status),
        json!(if roles.is_empty() {
            "<none>".to_string()
        } else {
            roles.join(",")
        }),
        json!(age(str_at(n, "/metadata/creationTimestamp"))),
        json!(str_at(n, "/status/nodeInfo/kubeletVersion")),
    ]
}

/// Column definitions and a row builder for a resource type.
/// Builds the cells of one row.
type RowFn<'a> = Box<dyn Fn(&Value) -> Vec<Value> + 'a>;

fn columns(rt: &ResourceType) -> (Vec<Value>, RowFn<'_>) {
    let name_col = column("Name", "string", 0);
    if rt.group.is_empty() && rt.plural == "pods" {
        let cols = vec![
            name_col,
            column("Ready", "string", 0),
            column("Status", "string", 0),
            column("Restarts", "string", 0),
            column("Age", "string", 0),
            column("IP", "string", 1),
            column("Node", "string", 1),
        ];
        return (cols, Box::new(pod_cells));
    }
    if rt.group.is_empty() && rt.plural == "nodes" {
        let cols = vec![
            name_col,
            column("Status", "string", 0),
            column("Roles", "string", 0),
            column("Age", "string", 0),
            column("Version", "string", 0),
        ];
        return (cols, Box::new(node_cells));
    }
    if rt.group.is_empty() && rt.plural == "persistentvolumeclaims" {
        let cols = vec![
            name_col,
            column("Status", "string", 0),
            column("Age", "string", 0),
        ];
        return (
            cols,
            Box::new(|o: &Value| {
                vec![
                    json!(str_at(o, "/metadata/name")),
                    json!(str_at(o, "/status/phase")),
                    json!(age(str_at(o, "/metadata/creationTimestamp"))),
                ]
            }),
        );
    }
    if !rt.printer_columns.is_empty() {
        let mut cols = vec![name_col];
        for c in &rt.printer_columns {
            let ty = c.get("type").and_then(Value::as_str).unwrap_or("string");
            let priority = c.get("priority").and_then(Value::as_i64).unwrap_or(0);
            let mut col = column(
                c.get("name").and_then(Value::as_str).unwrap_or(""),
                if ty == "date" { "string" } else { ty },
                priority,
            );
            col["description"] = c.get("description").cloned().unwrap_or(json!(""));
            cols.push(col);
        }
        let specs: Vec<(String, String)> = rt
            .printer_columns
            .iter()
            .map(|c| {
                (
                    c.get("jsonPath")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string(),
                    c.get("type")
                        .and_then(Value::as_str)
                        .unwrap_or("string")
                        .to_string(),
                )
            })
            .collect();
        return (
            cols,
            Box::new(move |o: &Value| {
                let mut cells = vec![json!(str_at(o, "/metadata/name"))];
                cells.extend(specs.iter().map(|(path, ty)| cell(json_path(o, path), ty)));
                cells
            }),
        );
    }
    (
        vec![name_col, column("Age", "string", 0)],
        Box::new(|o: &Value| {
            vec![
                json!(str_at(o, "/metadata/name")),
                json!(age(str_at(o, "/metadata/creationTimestamp"))),
            ]
        }),
    )
}

/// A Table of objects; each row carries the full object (kubectl reads labels from it for `-L`).
pub fn table(
    rt: &ResourceType,
    objects: &[&Value],
    rv: u64,
    continue_token: Option<&str>,
) -> Value {
    let (cols, cells) = columns(rt);
    let rows: Vec<Value> = objects
        .iter()
        .map(|o| json!({"cells": cells(o), "object": o}))
        .collect();
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if let Some(c) = continue_token {
        metadata["continue"] = json!(c);
    }
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": metadata,
        "columnDefinitions": cols,
        "rows": rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printer_columns_follow_json_paths() {
        let crd: Value =
            serde_yaml::from_str(include_str!("../../../../crds/loratrainingjob.yaml")).unwrap();
        let rt = super::super::resources::from_crd(&crd).unwrap().remove(0);
        let obj = json!({"metadata": {"name": "j", "creationTimestamp": "2020-01-01T00:00:00Z"},
                         "spec": {"baseModel": {"family": "sdxl"}}, "status": {"phase": "Running"}});
        let t = table(&rt, &[&obj], 5, None);
        let names: Vec<&str> = t["columnDefinitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names[..3], ["Name", "Phase", "Model"]);
        let cells = &t["rows"][0]["cells"];
        assert_eq!(cells[0], "j");
        assert_eq!(cells[1], "Running");
        assert_eq!(cells[2], "sdxl");
        assert!(cells[5].as_str().unwrap().ends_with('d'));
    }

    #[test]
    fn json_path_indexes_lists() {
        let v = json!({"a": {"b": [{"c": 1}]}});
        assert_eq!(json_path(&v, ".a.b[0].c"), Some(&json!(1)));
        assert_eq!(json_path(&v, ".a.x"), None);
    }
}
