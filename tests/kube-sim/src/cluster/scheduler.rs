//! The scheduler's decisions: which nodes fit a pod (nodeSelector, required node affinity,
//! taints vs tolerations, resource requests vs allocatable minus what bound pods use) and
//! which fitting node to pick, plus kube-scheduler's "0/N nodes are available" message.
//!
//! Pure; `runner.rs` feeds it the nodes and pods it watches. Filters run in kube-scheduler's
//! order (NodeUnschedulable, TaintToleration, NodeAffinity, NodeResourcesFit) and a node counts
//! once, under the first filter it fails, as in kube-scheduler. Among fitting nodes the one
//! left with the fewest free GPUs wins (bin-packing, what GPU clusters configure with
//! `MostAllocated`), ties broken by name so placement is reproducible.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::{
    Node, NodeSelectorRequirement, NodeSelectorTerm, Pod, Taint, Toleration,
};

use super::quantity;
use super::topology::RESOURCE_GPU;

/// Resource name → amount in base units.
pub type Resources = BTreeMap<String, f64>;

/// What a pod asks for: per container `requests`, falling back to `limits` (Kubernetes
/// defaults requests from limits); init containers count by their maximum.
pub fn pod_requests(pod: &Pod) -> Resources {
    let mut total = Resources::new();
    let Some(spec) = &pod.spec else {
        return total;
    };
    let container_requests = |c: &k8s_openapi::api::core::v1::Container| {
        let mut r = Resources::new();
        if let Some(res) = &c.resources {
            for map in [&res.limits, &res.requests].into_iter().flatten() {
                for (k, v) in map {
                    r.insert(k.clone(), quantity::parse(&v.0).unwrap_or(0.0));
                }
            }
        }
        r
    };
    for c in &spec.containers {
        for (k, v) in container_requests(c) {
            *total.entry(k).or_default() += v;
        }
    }
    for c in spec.init_containers.iter().flatten() {
        for (k, v) in container_requests(c) {
            let e = total.entry(k).or_default();
            *e = e.max(v);
        }
    }
    total
}

/// Whether a pod still holds its node's resources (bound and not Succeeded/Failed).
pub fn holds_resources(pod: &Pod) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    bound_node(pod).is_some() && !matches!(phase, Some("Succeeded" | "Failed"))
}

/// The node a pod is bound to.
pub fn bound_node(pod: &Pod) -> Option<&str> {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .filter(|n| !n.is_empty())
}

/// Sums the requests of the pods holding resources, per node.
pub fn usage_by_node<'a>(pods: impl IntoIterator<Item = &'a Pod>) -> HashMap<String, Resources> {
    let mut used: HashMap<String, Resources> = HashMap::new();
    for pod in pods {
        if !holds_resources(pod) {
            continue;
        }
        if let Some(node) = bound_node(pod) {
            let entry = used.entry(node.to_string()).or_default();
            for (k, v) in pod_requests(pod) {
                *entry.entry(k).or_default() += v;
            }
        }
    }
    used
}

/// Why one node does not fit (the reason strings kube-scheduler uses).
fn node_misfit(
    pod: &Pod,
    node: &Node,
    used: Option<&Resources>,
    requests: &Resources,
) -> Option<String> {
    let spec = node.spec.as_ref();
    if spec.and_then(|s| s.unschedulable).unwrap_or(false) {
        return Some("node(s) were unschedulable".into());
    }
    let tolerations: &[Toleration] = pod
        .spec
        .as_ref()
        .and_then(|s| s.tolerations.as_deref())
        .unwrap_or_default();
    for taint in spec.and_then(|s| s.taints.as_deref()).unwrap_or_default() {
        if matches!(taint.effect.as_str(), "NoSchedule" | "NoExecute")
            && !tolerations.iter().any(|t| tolerates(t, taint))
        {
            return Some(format!(
                "node(s) had untolerated taint {{{}: {}}}",
                taint.key,
                taint.value.as_deref().unwrap_or("")
            ));
        }
    }
    if !matches_node_selection(pod, node) {
        return Some("node(s) didn't match Pod's node affinity/selector".into());
    }
    let allocatable = node.status.as_ref().and_then(|s| s.allocatable.as_ref());
    for (resource, want) in requests {
        if *want <= 0.0 {
            continue;
        }
        let have = allocatable
            .and_then(|a| a.get(resource))
            .and_then(|q| quantity::parse(&q.0))
            .unwrap_or(0.0);
        let in_use = used.and_then(|u| u.get(resource)).copied().unwrap_or(0.0);
        if in_use + want > have + 1e-9 {
            return Some(format!("Insufficient {resource}"));
        }
    }
    None
}

/// Whether a toleration tolerates a taint (Kubernetes' `ToleratesTaint`).
pub fn tolerates(t: &Toleration, taint: &Taint) -> bool {
    if let Some(effect) = t.effect.as_deref().filter(|e| !e.is_empty())
        && effect != taint.effect
    {
        return false;
    }
    let key = t.key.as_deref().unwrap_or("");
    match t.operator.as_deref().unwrap_or("Equal") {
        "Exists" => key.is_empty() || key == taint.key,
        "Equal" => {
            key == taint.key
                && t.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or("")
        }
        _ => false,
    }
}

/// nodeSelector and required node affinity.
pub fn matches_node_selection(pod: &Pod, node: &Node) -> bool {
    let empty = BTreeMap::new();
    let labels = node.metadata.labels.as_ref().unwrap_or(&empty);
    let Some(spec) = &pod.spec else {
        return true;
    };
    if let Some(selector) = &spec.node_selector
        && !selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    {
        return false;
    }
    let required = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|na| {
            na.required_during_scheduling_ignored_during_execution
                .as_ref()
        });
    match required {
        // Terms are ORed; an empty list matches nothing, as in Kubernetes.
        Some(sel) => sel
            .node_selector_terms
            .iter()
            .any(|term| term_matches(term, labels, node.metadata.name.as_deref().unwrap_or(""))),
        None => true,
    }
}

fn term_matches(term: &NodeSelectorTerm, labels: &BTreeMap<String, String>, name: &str) -> bool {
    let exprs = term.match_expressions.as_deref().unwrap_or_default();
    let fields = term.match_fields.as_deref().unwrap_or_default();
    // A term without requirements selects no node.
    if exprs.is_empty() && fields.is_empty() {
        return false;
    }
    exprs
        .iter()
        .all(|r| requirement_matches(r, labels.get(&r.key).map(String::as_str)))
        && fields
            .iter()
            .all(|r| r.key == "metadata.name" && requirement_matches(r, Some(name)))
}

fn requirement_matches(r: &NodeSelectorRequirement, value: Option<&str>) -> bool {
    let values = r.values.as_deref().unwrap_or_default();
    let number = |s: &str| s.parse::<i64>().ok();
    match r.operator.as_str() {
        "In" => value.is_some_and(|v| values.iter().any(|x| x == v)),
        "NotIn" => value.is_none_or(|v| !values.iter().any(|x| x == v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" | "Lt" => {
            let (Some(v), Some(bound)) = (
                value.and_then(number),
                values.first().and_then(|b| number(b)),
            ) else {
                return false;
            };
            if r.operator == "Gt" {
                v > bound
            } else {
                v < bound
            }
        }
        _ => false,
    }
}

/// The outcome of scheduling one pod.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Bind to this node.
    Bind(String),
    /// No node fits; kube-scheduler's message.
    Unschedulable(String),
}

/// Picks a node for `pod` among `nodes`, given the resources pods already use per node.
pub fn schedule(pod: &Pod, nodes: &[&Node], used: &HashMap<String, Resources>) -> Decision {
    let requests = pod_requests(pod);
    let want_gpu = requests.get(RESOURCE_GPU).copied().unwrap_or(0.0);
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    let mut best: Option<(f64, &str)> = None;
    for node in nodes {
        let name = node.metadata.name.as_deref().unwrap_or("");
        let node_used = used.get(name);
        match node_misfit(pod, node, node_used, &requests) {
            Some(reason) => *reasons.entry(reason).or_default() += 1,
            None => {
                let gpus = node
                    .status
                    .as_ref()
                    .and_then(|s| s.allocatable.as_ref())
                    .and_then(|a| a.get(RESOURCE_GPU))
                    .and_then(|q| quantity::parse(&q.0))
                    .unwrap_or(0.0);
                let in_use = node_used
                    .and_then(|u| u.get(RESOURCE_GPU))
                    .copied()
                    .unwrap_or(0.0);
                let free_after = gpus - in_use - want_gpu;
                if best.is_none_or(|(f, n)| free_after < f || (free_after == f && name < n)) {
                    best = Some((free_after, name));
                }
            }
        }
    }
    if let Some((_, name)) = best {
        return Decision::Bind(name.to_string());
    }
    if nodes.is_empty() {
        return Decision::Unschedulable("no nodes available to schedule pods".into());
    }
    let mut parts: Vec<String> = reasons.iter().map(|(r, n)| format!("{n} {r}")).collect();
    // kube-scheduler sorts the "count reason" strings.
    parts.sort();
    Decision::Unschedulable(format!(
        "0/{} nodes are available: {}.",
        nodes.len(),
        parts.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::topology::Topology;

    fn topo() -> Vec<Node> {
        Topology::from_yaml(
            r#"
regions:
  - name: eu-west
    jurisdiction: eea
    pools:
      - {name: ew-l4, gpuProduct: NVIDIA-L4, gpuMemoryGiB: 24, gpusPerNode: 2, instanceType: g6, nodes: 2}
      - {name: ew-spot, gpuProduct: NVIDIA-L4, gpuMemoryGiB: 24, gpusPerNode: 1, spot: true, instanceType: g6, nodes: 1,
         taints: [{key: loraplane.io/spot, value: "true", effect: NoSchedule}]}
  - name: us-east
    jurisdiction: us
    pools:
      - {name: us-a100, gpuProduct: NVIDIA-A100-SXM4-80GB, gpuMemoryGiB: 80, gpusPerNode: 1, instanceType: p4d, nodes: 1}
"#,
        )
        .unwrap()
        .nodes()
    }

    fn pod(yaml: &str) -> Pod {
        let mut p: Pod = serde_yaml::from_str(yaml).unwrap();
        p.metadata.name.get_or_insert_with(|| "p".into());
        p
    }

    fn gpu_pod(gpus: u32, extra_spec: &str) -> Pod {
        pod(&format!(
            "spec:\n  containers:\n    - name: c\n      image: x\n      resources: {{limits: {{nvidia.com/gpu: \"{gpus}\"}}}}\n{extra_spec}"
        ))
    }

    fn run(p: &Pod, nodes: &[Node], used: &HashMap<String, Resources>) -> Decision {
        let refs: Vec<&Node> = nodes.iter().collect();
        schedule(p, &refs, used)
    }

    #[test]
    fn node_selector_picks_the_pool_and_bin_packs() {
        let nodes = topo();
        let p = gpu_pod(
            1,
            "  nodeSelector: {topology.kubernetes.io/region: us-east}\n",
        );
        assert_eq!(
            run(&p, &nodes, &HashMap::new()),
            Decision::Bind("us-a100-0".into())
        );
        // ew-l4-1 already runs one GPU pod: the next one-GPU pod fills it up first.
        let p = gpu_pod(1, "  nodeSelector: {loraplane.io/node-pool: ew-l4}\n");
        let used = HashMap::from([(
            "ew-l4-1".to_string(),
            Resources::from([(RESOURCE_GPU.to_string(), 1.0)]),
        )]);
        assert_eq!(run(&p, &nodes, &used), Decision::Bind("ew-l4-1".into()));
    }

    #[test]
    fn over_capacity_reports_kube_scheduler_message() {
        let nodes = topo();
        let p = gpu_pod(2, "  nodeSelector: {loraplane.io/node-pool: ew-l4}\n");
        let used = HashMap::from([
            (
                "ew-l4-0".to_string(),
                Resources::from([(RESOURCE_GPU.to_string(), 1.0)]),
            ),
            (
                "ew-l4-1".to_string(),
                Resources::from([(RESOURCE_GPU.to_string(), 2.0)]),
            ),
        ]);
        // The spot node fails on its taint first, like kube-scheduler's filter order.
        assert_eq!(
            run(&p, &nodes, &used),
            Decision::Unschedulable(
                "0/4 nodes are available: 1 node(s) didn't match Pod's node affinity/selector, \
                 1 node(s) had untolerated taint {loraplane.io/spot: true}, 2 Insufficient nvidia.com/gpu."
                    .into()
            )
        );
    }

    #[test]
    fn taints_need_a_matching_toleration() {
        let nodes = topo();
        let sel = "  nodeSelector: {loraplane.io/node-pool: ew-spot}\n";
        assert!(matches!(
            run(&gpu_pod(1, sel), &nodes, &HashMap::new()),
            Decision::Unschedulable(_)
        ));
        for tol in [
            "  tolerations: [{key: loraplane.io/spot, operator: Equal, value: \"true\", effect: NoSchedule}]\n",
            "  tolerations: [{key: loraplane.io/spot, operator: Exists}]\n",
            "  tolerations: [{operator: Exists}]\n",
        ] {
            let p = gpu_pod(1, &format!("{sel}{tol}"));
            assert_eq!(
                run(&p, &nodes, &HashMap::new()),
                Decision::Bind("ew-spot-0".into()),
                "{tol}"
            );
        }
        for tol in [
            "  tolerations: [{key: loraplane.io/spot, value: \"false\"}]\n",
            "  tolerations: [{key: loraplane.io/spot, operator: Exists, effect: NoExecute}]\n",
        ] {
            let p = gpu_pod(1, &format!("{sel}{tol}"));
            assert!(
                matches!(run(&p, &nodes, &HashMap::new()), Decision::Unschedulable(_)),
                "{tol}"
            );
        }
    }

    #[test]
    fn required_node_affinity_operators() {
        let nodes = topo();
        let aff = |exprs: &str| {
            gpu_pod(
                1,
                &format!(
                    "  tolerations: [{{operator: Exists}}]\n  affinity: {{nodeAffinity: {{requiredDuringSchedulingIgnoredDuringExecution: {{nodeSelectorTerms: [{{matchExpressions: [{exprs}]}}]}}}}}}\n"
                ),
            )
        };
        let region_in = "{key: topology.kubernetes.io/region, operator: In, values: [us-east]}";
        assert_eq!(
            run(&aff(region_in), &nodes, &HashMap::new()),
            Decision::Bind("us-a100-0".into())
        );
        let not_eu_not_spot = "{key: topology.kubernetes.io/region, operator: NotIn, values: [us-east]}, \
                               {key: karpenter.sh/capacity-type, operator: NotIn, values: [spot]}";
        assert_eq!(
            run(&aff(not_eu_not_spot), &nodes, &HashMap::new()),
            Decision::Bind("ew-l4-0".into())
        );
        let exists = "{key: team, operator: Exists}";
        assert!(
            matches!(run(&aff(exists), &nodes, &HashMap::new()), Decision::Unschedulable(m) if m.contains("4 node(s) didn't match"))
        );
        let absent = "{key: team, operator: DoesNotExist}, {key: nvidia.com/gpu.memory, operator: Gt, values: [\"40000\"]}";
        assert_eq!(
            run(&aff(absent), &nodes, &HashMap::new()),
            Decision::Bind("us-a100-0".into())
        );
    }

    #[test]
    fn terminated_pods_free_their_gpus() {
        let mut a = gpu_pod(1, "  nodeName: us-a100-0\n");
        let used = usage_by_node([&a]);
        assert_eq!(used["us-a100-0"][RESOURCE_GPU], 1.0);
        a.status = Some(serde_yaml::from_str("phase: Succeeded").unwrap());
        assert!(usage_by_node([&a]).is_empty());
    }

    #[test]
    fn cordoned_nodes_and_empty_clusters() {
        let mut nodes = topo();
        for n in &mut nodes {
            n.spec.get_or_insert_default().unschedulable = Some(true);
        }
        let Decision::Unschedulable(m) = run(&gpu_pod(1, ""), &nodes, &HashMap::new()) else {
            panic!("scheduled on a cordoned node");
        };
        assert_eq!(m, "0/4 nodes are available: 4 node(s) were unschedulable.");
        assert_eq!(
            run(&gpu_pod(1, ""), &[], &HashMap::new()),
            Decision::Unschedulable("no nodes available to schedule pods".into())
        );
    }
}
