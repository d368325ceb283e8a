//! The chart's RBAC is exactly what the code needs. The scenario of `contract/mod.rs` drives the
//! operator (two replicas: leader election and hand-over; a job created, placed, run,
//! preempted, resumed, succeeded, released and deleted by retention; another cancelled and
//! erased, each leaving an audit record) and the API (webhook orders, uploads, cancel and
//! erasure intent, refund tombstones) against kube-sim with its audit log on, each
//! component with its own client (told apart by User-Agent). The chart's RBAC is rendered with
//! Helm's own SDK, with the scenario's tenants and Stripe namespace (so the per-job-namespace
//! Roles land where its jobs live); then:
//!
//! - every call a component made is allowed by the rules bound to its ServiceAccount, with the
//!   binding's scope (a RoleBinding grants only in its namespace, a ClusterRoleBinding
//!   everywhere, including cluster-scoped resources and lists across namespaces);
//! - every rule (verb × resource) of every role was used by some call, or is in
//!   `NOT_EXERCISED` with the reason a real cluster needs it (a Role rendered into several
//!   job namespaces is one template: a call in any of them uses its rule);
//! - nothing bound cluster-wide writes: writes to pods, Secrets, claims, ConfigMaps, Leases,
//!   Events and jobs are granted per namespace.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod contract;

use std::collections::{BTreeMap, BTreeSet};

use kube_sim::apiserver::audit::AuditRecord;
use serde_json::Value;

/// Rules no scenario here exercises, each with why it stays: `(component, verb, group,
/// resource, why)`.
const NOT_EXERCISED: &[(&str, &str, &str, &str, &str)] = &[(
    "operator",
    "update",
    "loraplane.io",
    "loratrainingjobs/finalizers",
    "the operator's pods, claims and Secrets carry ownerReferences with blockOwnerDeletion; \
     on clusters with the OwnerReferencesPermissionEnforcement admission plugin (OpenShift, \
     hardened clusters) that needs update on the owner's finalizers; kube-sim has no admission \
     plugins",
)];

/// Rules the scenario uses only when timing allows, exempt from the "unused" check either way:
/// `(component, verb, group, resource, why)`.
const MAY_BE_EXERCISED: &[(&str, &str, &str, &str, &str)] = &[
    (
        "operator",
        "get",
        "",
        "pods",
        "the operator reads a pod from the apiserver only when its pod cache has not caught up \
         with what the last decision saw, or to confirm a stray pod before deleting it; with \
         finished pods now released from the cache's list, whether a reconcile lands in such a \
         window depends on the machine's load",
    ),
    (
        "operator",
        "get",
        "",
        "nodes",
        "the operator asks the apiserver for a pod's node only when its node cache no longer \
         holds it during a reconcile (the lost-node path); whether a reconcile lands in that \
         window depends on the machine's load, so the lost node in the scenario exercises it in \
         most runs, not all",
    ),
    (
        "operator",
        "delete",
        "",
        "pods",
        "the operator deletes the pod of an attempt it ends only while that pod still runs; after \
         the lost node, kube-sim's taint manager marks the pod failed, and on a loaded machine it \
         can do so before the operator's reconcile, leaving nothing to delete (suspend and \
         capacity failover, which always delete, are not in the scenario)",
    ),
];

/// One RBAC rule, as the chart renders it.
#[derive(Debug, Clone)]
struct Rule {
    groups: Vec<String>,
    resources: Vec<String>,
    verbs: Vec<String>,
    names: Vec<String>,
}

/// The rules a ServiceAccount gets through one binding: everywhere (`namespace: None`, a
/// ClusterRoleBinding) or in one namespace (a RoleBinding).
#[derive(Debug, Clone)]
struct Grant {
    binding: String,
    /// `Kind/name` of the role bound: one Role rendered into several namespaces is one role.
    role: String,
    namespace: Option<String>,
    rules: Vec<Rule>,
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn matches(list: &[String], item: &str) -> bool {
    list.iter().any(|x| x == "*" || x == item)
}

impl Rule {
    fn of(v: &Value) -> Rule {
        Rule {
            groups: strings(&v["apiGroups"]),
            resources: strings(&v["resources"]),
            verbs: strings(&v["verbs"]),
            names: strings(&v["resourceNames"]),
        }
    }

    fn allows(&self, r: &AuditRecord) -> bool {
        matches(&self.groups, &r.group)
            && matches(&self.resources, &r.rbac_resource())
            && matches(&self.verbs, &r.verb)
            && (self.names.is_empty() || r.name.as_ref().is_some_and(|n| self.names.contains(n)))
    }
}

impl Grant {
    fn allows(&self, r: &AuditRecord) -> bool {
        let in_scope = match &self.namespace {
            None => true,
            Some(ns) => r.namespace.as_ref() == Some(ns),
        };
        in_scope && self.rules.iter().any(|rule| rule.allows(r))
    }
}

/// The grants of ServiceAccount `namespace/name` in the rendered objects.
fn grants_of(objects: &[Value], namespace: &str, name: &str) -> Vec<Grant> {
    let role = |kind: &str, role_name: &str, role_ns: Option<&str>| -> Vec<Rule> {
        let found = objects.iter().find(|o| {
            o["kind"] == kind
                && o["metadata"]["name"] == role_name
                && (kind == "ClusterRole"
                    || o["metadata"]["namespace"]
                        .as_str()
                        .unwrap_or(role_ns.unwrap_or(""))
                        == role_ns.unwrap_or(""))
        });
        let found = found.unwrap_or_else(|| panic!("{kind} {role_name} is not rendered"));
        found["rules"]
            .as_array()
            .unwrap()
            .iter()
            .map(Rule::of)
            .collect()
    };
    let mut grants = Vec::new();
    for b in objects {
        let kind = b["kind"].as_str().unwrap_or("");
        if kind != "RoleBinding" && kind != "ClusterRoleBinding" {
            continue;
        }
        let bound = strings(&Value::Array(
            b["subjects"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|s| s["kind"] == "ServiceAccount" && s["namespace"] == namespace)
                .map(|s| s["name"].clone())
                .collect(),
        ));
        if !bound.iter().any(|n| n == name) {
            continue;
        }
        // A RoleBinding without a namespace lands in the release namespace.
        let binding_ns = (kind == "RoleBinding").then(|| {
            b["metadata"]["namespace"]
                .as_str()
                .unwrap_or(namespace)
                .to_string()
        });
        let role_ref = &b["roleRef"];
        let rules = role(
            role_ref["kind"].as_str().unwrap(),
            role_ref["name"].as_str().unwrap(),
            binding_ns.as_deref(),
        );
        grants.push(Grant {
            binding: format!("{kind}/{}", b["metadata"]["name"].as_str().unwrap()),
            role: format!(
                "{}/{}",
                role_ref["kind"].as_str().unwrap(),
                role_ref["name"].as_str().unwrap()
            ),
            namespace: binding_ns,
            rules,
        });
    }
    grants
}

/// The chart rendered with the scenario's values ([`contract::chart_values`]: its tenants and
/// Stripe namespace, the S3 CIDRs) by Helm's Go SDK (helm-python-sdk), as the chart tests do:
/// RBAC objects and Deployments.
fn render_chart() -> Vec<Value> {
    let kinds = [
        "Role",
        "ClusterRole",
        "RoleBinding",
        "ClusterRoleBinding",
        "Deployment",
    ];
    loraplane_e2e::helm::render(&contract::chart_values(), "loraplane", "loraplane-system")
        .unwrap_or_else(|e| panic!("{e}"))
        .into_iter()
        .filter(|d| d["kind"].as_str().is_some_and(|k| kinds.contains(&k)))
        .collect()
}

/// The ServiceAccount a rendered Deployment runs as.
fn service_account(objects: &[Value], deployment: &str) -> (String, String) {
    let d = objects
        .iter()
        .find(|o| o["kind"] == "Deployment" && o["metadata"]["name"] == deployment)
        .unwrap_or_else(|| panic!("Deployment {deployment} is not rendered"));
    let ns = d["metadata"]["namespace"]
        .as_str()
        .unwrap_or("loraplane-system")
        .to_string();
    let sa = d["spec"]["template"]["spec"]["serviceAccountName"]
        .as_str()
        .unwrap_or_else(|| panic!("Deployment {deployment} names no serviceAccountName"))
        .to_string();
    (ns, sa)
}

fn describe(r: &AuditRecord) -> String {
    let group = if r.group.is_empty() { "core" } else { &r.group };
    let scope = r
        .namespace
        .as_deref()
        .map_or("cluster-wide".to_string(), |n| format!("in {n}"));
    format!("{} {group}/{} {scope}", r.verb, r.rbac_resource())
}

/// Calls no grant allows, described once each.
fn forbidden(grants: &[Grant], calls: &[&AuditRecord]) -> BTreeSet<String> {
    calls
        .iter()
        .filter(|r| !grants.iter().any(|g| g.allows(r)))
        .map(|r| describe(r))
        .collect()
}

/// Rule items (role, verb, group, resource) no call used. A Role bound in several namespaces
/// (the per-job-namespace Roles) counts as one: its rule is used if a call in any of them
/// needed it, since every job namespace runs the same code paths and which one a scenario
/// takes where is the scenario's choice.
fn unused(grants: &[Grant], calls: &[&AuditRecord]) -> BTreeSet<(String, String, String, String)> {
    let mut granted = BTreeSet::new();
    let mut used = BTreeSet::new();
    for g in grants {
        for rule in &g.rules {
            for group in &rule.groups {
                for resource in &rule.resources {
                    for verb in &rule.verbs {
                        let item = (
                            g.role.clone(),
                            verb.clone(),
                            group.clone(),
                            resource.clone(),
                        );
                        if calls.iter().any(|r| {
                            r.group == *group
                                && r.rbac_resource() == *resource
                                && r.verb == *verb
                                && g.allows(r)
                        }) {
                            used.insert(item.clone());
                        }
                        granted.insert(item);
                    }
                }
            }
        }
    }
    granted.difference(&used).cloned().collect()
}

/// Verbs that only read: the only ones a ClusterRoleBinding may grant.
const READ_VERBS: &[&str] = &["get", "list", "watch"];

/// Rules bound cluster-wide that write (any verb but get, list, watch), described.
fn cluster_wide_writes(grants: &[Grant]) -> Vec<String> {
    grants
        .iter()
        .filter(|g| g.namespace.is_none())
        .flat_map(|g| {
            g.rules.iter().filter_map(move |rule| {
                let writes: Vec<&str> = rule
                    .verbs
                    .iter()
                    .map(String::as_str)
                    .filter(|v| !READ_VERBS.contains(v))
                    .collect();
                (!writes.is_empty()).then(|| {
                    format!(
                        "{} grants {writes:?} on {:?} in every namespace",
                        g.binding, rule.resources
                    )
                })
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charts_rbac_allows_every_call_and_nothing_unused() {
    // Render first: a missing venv fails fast, before the scenario.
    let objects = render_chart();
    // Two runs of the scenario, their calls united: which reconcile lands in which window
    // (a lost node, a preempted pod) depends on the machine's load, and a rule counts as used
    // if either run needed it. Every call of both runs must still be allowed.
    let mut outcome = tokio::time::timeout(std::time::Duration::from_secs(150), contract::run())
        .await
        .expect("the scenario finishes within 150 s");
    let second = tokio::time::timeout(std::time::Duration::from_secs(150), contract::run())
        .await
        .expect("the second scenario run finishes within 150 s");
    outcome.audit.extend(second.audit);

    let mut report = Vec::new();
    let mut unused_report = Vec::new();
    let mut allow_listed_but_used = Vec::new();
    let mut written_cluster_wide = Vec::new();
    for (component, agent, deployment) in [
        ("operator", contract::OPERATOR_AGENT, "loraplane-operator"),
        ("api", contract::API_AGENT, "loraplane-api"),
    ] {
        let calls: Vec<&AuditRecord> = outcome
            .audit
            .iter()
            .filter(|r| r.user_agent == agent)
            .collect();
        assert!(
            calls.len() > 10,
            "the {component} made only {} audited calls",
            calls.len()
        );
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for r in &calls {
            *counts.entry(describe(r)).or_default() += 1;
        }
        eprintln!("{component} calls: {counts:#?}");
        let (ns, sa) = service_account(&objects, deployment);
        let grants = grants_of(&objects, &ns, &sa);
        assert!(
            !grants.is_empty(),
            "nothing is bound to ServiceAccount {ns}/{sa}"
        );
        for write in cluster_wide_writes(&grants) {
            written_cluster_wide.push(format!("{component}: {write}"));
        }
        for call in forbidden(&grants, &calls) {
            report.push(format!("{component} ({ns}/{sa}) may not: {call}"));
        }
        let listed: BTreeMap<(&str, &str, &str), &str> = NOT_EXERCISED
            .iter()
            .filter(|e| e.0 == component)
            .map(|e| ((e.1, e.2, e.3), e.4))
            .collect();
        let never_used = unused(&grants, &calls);
        let sometimes: BTreeSet<(&str, &str, &str)> = MAY_BE_EXERCISED
            .iter()
            .filter(|e| e.0 == component)
            .map(|e| (e.1, e.2, e.3))
            .collect();
        for (role, verb, group, resource) in &never_used {
            let key = (verb.as_str(), group.as_str(), resource.as_str());
            if !listed.contains_key(&key) && !sometimes.contains(&key) {
                unused_report.push(format!(
                    "{component}: {role} grants {verb} {group}/{resource}, which no call used"
                ));
            }
        }
        for (verb, group, resource) in listed.keys() {
            let granted_unused = never_used
                .iter()
                .any(|(_, v, g, r)| v == verb && g == group && r == resource);
            if !granted_unused {
                allow_listed_but_used.push(format!(
                    "{component}: {verb} {group}/{resource} is in NOT_EXERCISED but is either \
                     used or not granted: drop the entry"
                ));
            }
        }
    }
    assert!(
        written_cluster_wide.is_empty(),
        "writes (to pods, Secrets, claims, ConfigMaps, Leases, Events, jobs…) must be granted \
         per job namespace, by a Role, never cluster-wide:\n{}",
        written_cluster_wide.join("\n")
    );
    assert!(
        report.is_empty(),
        "calls the chart's RBAC would refuse (403 on a real cluster):\n{}",
        report.join("\n")
    );
    assert!(
        unused_report.is_empty(),
        "rules no call needs (least privilege: remove them, or justify in NOT_EXERCISED):\n{}",
        unused_report.join("\n")
    );
    assert!(
        allow_listed_but_used.is_empty(),
        "{}",
        allow_listed_but_used.join("\n")
    );
}

fn record(
    verb: &str,
    group: &str,
    resource: &str,
    sub: Option<&str>,
    ns: Option<&str>,
) -> AuditRecord {
    AuditRecord {
        user_agent: "t".into(),
        verb: verb.into(),
        group: group.into(),
        resource: resource.into(),
        subresource: sub.map(String::from),
        namespace: ns.map(String::from),
        name: None,
    }
}

#[test]
fn a_role_binding_grants_only_in_its_namespace_and_subresources_are_separate() {
    let leases = Grant {
        binding: "RoleBinding/le".into(),
        role: "Role/le".into(),
        namespace: Some("sys".into()),
        rules: vec![Rule {
            groups: vec!["coordination.k8s.io".into()],
            resources: vec!["leases".into()],
            verbs: vec!["get".into(), "update".into()],
            names: vec![],
        }],
    };
    let jobs = Grant {
        binding: "ClusterRoleBinding/op".into(),
        role: "ClusterRole/op".into(),
        namespace: None,
        rules: vec![Rule {
            groups: vec!["loraplane.io".into()],
            resources: vec!["loratrainingjobs".into()],
            verbs: vec!["list".into(), "watch".into()],
            names: vec![],
        }],
    };
    let grants = [leases, jobs];
    let ok = [
        record("get", "coordination.k8s.io", "leases", None, Some("sys")),
        record("list", "loraplane.io", "loratrainingjobs", None, None),
        record(
            "watch",
            "loraplane.io",
            "loratrainingjobs",
            None,
            Some("tenant"),
        ),
    ];
    let refused = [
        record("get", "coordination.k8s.io", "leases", None, Some("other")),
        record("list", "coordination.k8s.io", "leases", None, None),
        record("create", "coordination.k8s.io", "leases", None, Some("sys")),
        record(
            "patch",
            "loraplane.io",
            "loratrainingjobs",
            Some("status"),
            Some("t"),
        ),
        record("list", "", "loratrainingjobs", None, None),
    ];
    let all: Vec<&AuditRecord> = ok.iter().chain(&refused).collect();
    assert_eq!(
        forbidden(&grants, &all),
        refused.iter().map(describe).collect::<BTreeSet<_>>()
    );
    let used: Vec<&AuditRecord> = ok.iter().collect();
    let unused: Vec<_> = unused(&grants, &used).into_iter().map(|u| u.1).collect();
    assert_eq!(unused, vec!["update".to_string()]);
}

#[test]
fn a_role_in_several_namespaces_is_one_role_and_cluster_wide_writes_are_caught() {
    let in_ns = |ns: &str| Grant {
        binding: "RoleBinding/op".into(),
        role: "Role/op".into(),
        namespace: Some(ns.into()),
        rules: vec![Rule {
            groups: vec!["".into()],
            resources: vec!["secrets".into()],
            verbs: vec!["create".into(), "delete".into()],
            names: vec![],
        }],
    };
    let grants = [in_ns("a"), in_ns("b")];
    // create used only in a, delete only in b: neither is unused.
    let calls = [
        record("create", "", "secrets", None, Some("a")),
        record("delete", "", "secrets", None, Some("b")),
    ];
    let used: Vec<&AuditRecord> = calls.iter().collect();
    assert!(unused(&grants, &used).is_empty());
    // A namespaced grant may write; the same rules bound cluster-wide may not.
    assert!(cluster_wide_writes(&grants).is_empty());
    let everywhere = Grant {
        binding: "ClusterRoleBinding/op".into(),
        role: "ClusterRole/op".into(),
        namespace: None,
        ..in_ns("a")
    };
    assert_eq!(
        cluster_wide_writes(&[everywhere]),
        vec![
            r#"ClusterRoleBinding/op grants ["create", "delete"] on ["secrets"] in every namespace"#
        ]
    );
}
