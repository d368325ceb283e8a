//! The resource types the apiserver serves: built-in ones and those installed by CRDs, and the
//! discovery documents (`/api`, `/apis`, `/api/v1`, `/apis/{group}/{version}`) derived from them.

use std::sync::Arc;

use serde_json::{Value, json};

use crate::schema::Schema;

/// One served resource type (one group/version/plural).
#[derive(Debug, Clone)]
pub struct ResourceType {
    /// API group, empty for core.
    pub group: String,
    /// API version, e.g. `v1`.
    pub version: String,
    /// Kind, e.g. `Pod`.
    pub kind: String,
    /// Plural resource name, e.g. `pods`.
    pub plural: String,
    /// Singular name.
    pub singular: String,
    /// Namespaced or cluster-scoped.
    pub namespaced: bool,
    /// Short names (`ltj`, `po`).
    pub short_names: Vec<String>,
    /// Categories (`all`, `loraplane`).
    pub categories: Vec<String>,
    /// Whether `/status` is a separate subresource.
    pub status_subresource: bool,
    /// Validation schema for custom resources.
    pub schema: Option<Arc<Schema>>,
    /// `additionalPrinterColumns` of a CRD version.
    pub printer_columns: Vec<Value>,
    /// Whether the type comes from a CRD (so it disappears with it).
    pub custom: bool,
}

impl ResourceType {
    /// `v1` or `group/v1`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    fn builtin(
        group: &str,
        version: &str,
        kind: &str,
        plural: &str,
        namespaced: bool,
        short: &[&str],
        status_subresource: bool,
    ) -> ResourceType {
        ResourceType {
            group: group.to_string(),
            version: version.to_string(),
            kind: kind.to_string(),
            plural: plural.to_string(),
            singular: kind.to_lowercase(),
            namespaced,
            short_names: short.iter().map(|s| s.to_string()).collect(),
            categories: Vec::new(),
            status_subresource,
            schema: None,
            printer_columns: Vec::new(),
            custom: false,
        }
    }

    /// Subresources listed in discovery.
    fn subresources(&self) -> Vec<&'static str> {
        let mut subs = Vec::new();
        if self.status_subresource {
            subs.push("status");
        }
        if self.group.is_empty() && self.plural == "pods" {
            subs.extend(["log", "binding", "eviction"]);
        }
        subs
    }

    fn discovery_entry(&self) -> Vec<Value> {
        let mut entries = vec![json!({
            "name": self.plural,
            "singularName": self.singular,
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
            "shortNames": self.short_names,
            "categories": self.categories,
        })];
        for sub in self.subresources() {
            let (kind, verbs) = match sub {
                "status" => (self.kind.as_str(), json!(["get", "patch", "update"])),
                "log" => ("Pod", json!(["get"])),
                "binding" => ("Binding", json!(["create"])),
                _ => ("Eviction", json!(["create"])),
            };
            entries.push(json!({
                "name": format!("{}/{sub}", self.plural),
                "singularName": "",
                "namespaced": self.namespaced,
                "kind": kind,
                "verbs": verbs,
            }));
        }
        entries
    }
}

/// The built-in resource types.
pub fn builtins() -> Vec<ResourceType> {
    let mut all = vec![
        ResourceType::builtin("", "v1", "Pod", "pods", true, &["po"], true),
        ResourceType::builtin(
            "",
            "v1",
            "PersistentVolumeClaim",
            "persistentvolumeclaims",
            true,
            &["pvc"],
            true,
        ),
        ResourceType::builtin("", "v1", "Node", "nodes", false, &["no"], true),
        ResourceType::builtin("", "v1", "Namespace", "namespaces", false, &["ns"], true),
        ResourceType::builtin("", "v1", "Secret", "secrets", true, &[], false),
        ResourceType::builtin("", "v1", "ConfigMap", "configmaps", true, &["cm"], false),
        ResourceType::builtin("", "v1", "Event", "events", true, &["ev"], false),
        ResourceType::builtin("", "v1", "Service", "services", true, &["svc"], true),
        ResourceType::builtin(
            "",
            "v1",
            "ServiceAccount",
            "serviceaccounts",
            true,
            &["sa"],
            false,
        ),
        ResourceType::builtin(
            "events.k8s.io",
            "v1",
            "Event",
            "events",
            true,
            &["ev"],
            false,
        ),
        ResourceType::builtin(
            "coordination.k8s.io",
            "v1",
            "Lease",
            "leases",
            true,
            &[],
            false,
        ),
        ResourceType::builtin(
            "apiextensions.k8s.io",
            "v1",
            "CustomResourceDefinition",
            "customresourcedefinitions",
            false,
            &["crd", "crds"],
            true,
        ),
    ];
    for rt in &mut all {
        if rt.group.is_empty()
            && matches!(
                rt.plural.as_str(),
                "pods"
                    | "persistentvolumeclaims"
                    | "services"
                    | "configmaps"
                    | "secrets"
                    | "serviceaccounts"
                    | "events"
            )
            && rt.plural != "events"
        {
            rt.categories = vec!["all".to_string()];
        }
    }
    all
}

/// Resource types a CRD object defines (one per served version), or why it cannot be served.
pub fn from_crd(crd: &Value) -> Result<Vec<ResourceType>, String> {
    let spec = crd.get("spec").ok_or("CRD has no spec")?;
    let group = spec
        .get("group")
        .and_then(Value::as_str)
        .ok_or("spec.group is required")?;
    let names = spec.get("names").ok_or("spec.names is required")?;
    let s = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or_default().to_string();
    let kind = s(names.get("kind"));
    let plural = s(names.get("plural"));
    if kind.is_empty() || plural.is_empty() {
        return Err("spec.names.kind and spec.names.plural are required".to_string());
    }
    let list = |v: Option<&Value>| -> Vec<String> {
        v.and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default()
    };
    let namespaced = spec.get("scope").and_then(Value::as_str) != Some("Cluster");
    let mut out = Vec::new();
    for version in spec
        .get("versions")
        .and_then(Value::as_array)
        .ok_or("spec.versions is required")?
    {
        if version.get("served").and_then(Value::as_bool) == Some(false) {
            continue;
        }
        let schema = match version.pointer("/schema/openAPIV3Schema") {
            Some(raw) => {
                let problems = crate::schema::structural_problems(raw);
                if !problems.is_empty() {
                    return Err(problems.join("; "));
                }
                Some(Arc::new(
                    Schema::new(raw.clone()).map_err(|e| e.to_string())?,
                ))
            }
            None => None,
        };
        out.push(ResourceType {
            group: group.to_string(),
            version: s(version.get("name")),
            kind: kind.clone(),
            plural: plural.clone(),
            singular: {
                let v = s(names.get("singular"));
                if v.is_empty() { kind.to_lowercase() } else { v }
            },
            namespaced,
            short_names: list(names.get("shortNames")),
            categories: list(names.get("categories")),
            status_subresource: version.pointer("/subresources/status").is_some(),
            schema,
            printer_columns: version
                .get("additionalPrinterColumns")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default(),
            custom: true,
        });
    }
    Ok(out)
}

/// `/api`
pub fn core_versions() -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}],
    })
}

fn groups_of(types: &[ResourceType]) -> Vec<(String, Vec<String>)> {
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for rt in types.iter().filter(|rt| !rt.group.is_empty()) {
        match groups.iter_mut().find(|(g, _)| *g == rt.group) {
            Some((_, versions)) => {
                if !versions.contains(&rt.version) {
                    versions.push(rt.version.clone());
                }
            }
            None => groups.push((rt.group.clone(), vec![rt.version.clone()])),
        }
    }
    groups
}

fn group_json(group: &str, versions: &[String]) -> Value {
    let vs: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
        .collect();
    json!({
        "name": group,
        "versions": vs,
        "preferredVersion": vs.first().cloned().unwrap_or(Value::Null),
    })
}

/// `/apis`
pub fn group_list(types: &[ResourceType]) -> Value {
    let groups: Vec<Value> = groups_of(types)
        .iter()
        .map(|(g, vs)| group_json(g, vs))
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `/apis/{group}`, `None` when the group is not served.
pub fn group(types: &[ResourceType], group: &str) -> Option<Value> {
    groups_of(types)
        .iter()
        .find(|(g, _)| g == group)
        .map(|(g, vs)| {
            let mut v = group_json(g, vs);
            v["kind"] = json!("APIGroup");
            v["apiVersion"] = json!("v1");
            v
        })
}

/// `/api/v1` or `/apis/{group}/{version}`, `None` when nothing is served there.
pub fn resource_list(types: &[ResourceType], group: &str, version: &str) -> Option<Value> {
    let resources: Vec<Value> = types
        .iter()
        .filter(|rt| rt.group == group && rt.version == version)
        .flat_map(ResourceType::discovery_entry)
        .collect();
    if resources.is_empty() {
        return None;
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loraplane_crd_defines_a_namespaced_type_with_status_and_columns() {
        let crd: Value =
            serde_yaml::from_str(include_str!("../../../../crds/loratrainingjob.yaml")).unwrap();
        let types = from_crd(&crd).unwrap();
        assert_eq!(types.len(), 1);
        let t = &types[0];
        assert_eq!(
            (t.group.as_str(), t.plural.as_str()),
            ("loraplane.io", "loratrainingjobs")
        );
        assert!(t.namespaced && t.status_subresource && t.schema.is_some());
        assert_eq!(t.short_names, vec!["ltj"]);
        assert!(!t.printer_columns.is_empty());
        let mut all = builtins();
        all.extend(types);
        let list = resource_list(&all, "loraplane.io", "v1alpha1").unwrap();
        assert_eq!(list["resources"][1]["name"], "loratrainingjobs/status");
        assert!(group(&all, "loraplane.io").is_some());
        assert!(
            resource_list(&all, "", "v1").unwrap()["resources"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["name"] == "pods/log")
        );
    }
}
