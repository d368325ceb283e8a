"""The loraplane chart, rendered and linted by Helm's own Go SDK (helm-python-sdk) and every
rendered object validated strictly by kubernetes-validate for the Kubernetes version the
workspace targets. Run by `make test` (target `chart-test`) with the tools `make bootstrap`
installs into .tools/venv."""

import copy
import ipaddress
import json
import pathlib

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

CHART = pathlib.Path(__file__).resolve().parents[1]
ROOT = CHART.parents[1]
# The Kubernetes version chosen once for the workspace (k8s-openapi feature v1_33).
K8S_VERSION = "1.33.0"
VALUES_FILES = sorted((CHART / "ci").glob("*-values.yaml"))
# Kinds served by CRDs that kubernetes-validate has no schema for.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}


# What an installation must say that the chart cannot default (where its S3 endpoints are).
REQUIRED = {"networkPolicy": {"s3Cidrs": ["203.0.113.0/24"], "stripeCidrs": ["198.51.100.0/24"]}}


def with_required(values):
    merged = copy.deepcopy(REQUIRED)
    for key, value in (values or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def render(values=None, required=True):
    with helm.Chart.load(str(CHART)) as chart:
        values = with_required(values) if required else (values or {})
        out = chart.render(values, name="loraplane", namespace="loraplane-system")
    objects = []
    for text in out.values():
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def values_of(path):
    return yaml.safe_load(path.read_text()) if path else {}


def by_kind(objects, kind):
    return [o for o in objects if o["kind"] == kind]


def test_lint_reports_no_errors():
    result = helm.lint(str(CHART), REQUIRED)
    errors = [m for m in result["messages"] if m["severity"] >= 3] + list(result["errors"] or [])
    assert not errors, errors


@pytest.mark.parametrize("values_file", [None, *VALUES_FILES], ids=lambda p: p.name if p else "defaults")
def test_every_rendered_object_is_valid_for_the_target_kubernetes(values_file):
    objects = render(values_of(values_file))
    assert objects
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
            with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
            continue
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {err.message} at {list(err.path)}")


def test_chart_ships_the_generated_crd():
    shipped = (CHART / "files" / "loratrainingjob.yaml").read_text()
    generated = (ROOT / "crds" / "loratrainingjob.yaml").read_text()
    assert shipped == generated, "charts/loraplane/files/loratrainingjob.yaml is stale: run `make crdgen`"
    crd = by_kind(render(), "CustomResourceDefinition")[0]
    assert crd["spec"] == yaml.safe_load(generated)["spec"]
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_crds_can_be_left_to_another_tool():
    assert not by_kind(render({"crds": {"install": False}}), "CustomResourceDefinition")


def test_workloads_are_locked_down_and_replicated():
    objects = render()
    deployments = {d["metadata"]["name"]: d for d in by_kind(objects, "Deployment")}
    assert deployments["loraplane-operator"]["spec"]["replicas"] >= 2
    assert deployments["loraplane-api"]["spec"]["replicas"] >= 2
    for dep in deployments.values():
        pod = dep["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"], c["name"]
            assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
            assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
            assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert len(by_kind(objects, "PodDisruptionBudget")) == 2


def mebibytes(quantity):
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return float(quantity[: -len(suffix)]) * factor
    return float(quantity) / 2**20


def test_the_api_memory_limit_holds_its_dataset_checks():
    """Each concurrent dataset check may hold one file and one decoded image
    (loraplane_crds::dataset::DatasetRules defaults); the API must not be killed for it."""
    objects = render()
    api = next(d for d in by_kind(objects, "Deployment") if d["metadata"]["name"] == "loraplane-api")
    limit = mebibytes(api["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"])
    max_entry_mib, max_decode_mib, checks, idle_mib = 64, 256, 2, 128
    assert limit >= checks * (max_entry_mib + max_decode_mib) + idle_mib


def test_no_secret_material_is_rendered():
    objects = render(values_of(CHART / "ci" / "multi-region-values.yaml"))
    assert not by_kind(objects, "Secret"), "credentials must come from existing Secrets"
    api = next(d for d in by_kind(objects, "Deployment") if d["metadata"]["name"] == "loraplane-api")
    env = {e["name"]: e for e in api["spec"]["template"]["spec"]["containers"][0]["env"]}
    for name in ("STRIPE_WEBHOOK_SECRET", "STRIPE_API_KEY", "ID_HASH_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "secretKeyRef" in env[name]["valueFrom"], name


def test_platform_config_reaches_the_operator_and_api():
    objects = render(values_of(CHART / "ci" / "eea-only-values.yaml"))
    config = next(c for c in by_kind(objects, "ConfigMap") if c["metadata"]["name"] == "loraplane-config")
    platform = yaml.safe_load(config["data"]["platform.yaml"])
    assert {r["jurisdiction"] for r in platform["regions"]} == {"eea"}
    # An empty trainerImage is filled with the chart's trainer image.
    assert platform["families"][0]["trainerImage"].endswith("/loraplane-trainer:0.1.0")
    api = yaml.safe_load(config["data"]["api.yaml"])
    assert api["plans"]["private-eea"]["retention"] == "zeroRetention"
    assert api["plans"]["private-eea"]["resolution"] == 512
    # The API holds no lease and runs no loop: retention is the operator's.
    assert "leaseNamespace" not in api


def test_trainer_network_policy_lands_in_every_namespace_jobs_run_in():
    objects = render(values_of(CHART / "ci" / "multi-region-values.yaml"))
    trainer = [p for p in by_kind(objects, "NetworkPolicy") if p["metadata"]["name"].endswith("-trainer")]
    assert sorted(p["metadata"]["namespace"] for p in trainer) == ["loraplane-orders", "tenant-acme", "tenant-globex"]
    for p in trainer:
        assert p["spec"]["ingress"] == []
        cidrs = {peer["ipBlock"]["cidr"] for rule in p["spec"]["egress"] for peer in rule["to"] if "ipBlock" in peer}
        assert cidrs == {"52.0.0.0/8", "3.0.0.0/8"}


WRITE_VERBS = {"create", "update", "patch", "delete", "deletecollection", "*"}
JOB_RESOURCES = {"secrets", "pods", "persistentvolumeclaims", "configmaps", "leases", "events", "*"}


def test_rbac_is_granted_per_job_namespace_and_cluster_wide_only_reads():
    """Two tenants and the Stripe namespace: the operator's and the API's Roles and
    RoleBindings land in exactly those three (an extra job namespace gets the operator's
    only), and no ClusterRole bound to either may write anything."""
    values = values_of(CHART / "ci" / "multi-region-values.yaml")
    job_namespaces = {"loraplane-orders", "tenant-acme", "tenant-globex"}
    for extra, operator_namespaces in (([], job_namespaces), (["batch"], job_namespaces | {"batch"})):
        objects = render({**values, "jobNamespaces": extra})
        for component, expected in (("operator", operator_namespaces), ("api", job_namespaces)):
            name = f"loraplane-{component}"
            for kind in ("Role", "RoleBinding"):
                found = [o["metadata"].get("namespace") for o in by_kind(objects, kind) if o["metadata"]["name"] == name]
                assert sorted(found) == sorted(expected), (kind, name, found)
            for binding in (b for b in by_kind(objects, "RoleBinding") if b["metadata"]["name"] == name):
                assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name}
                assert binding["subjects"] == [{"kind": "ServiceAccount", "name": name, "namespace": "loraplane-system"}]
        # Everything a ServiceAccount of the chart gets cluster-wide only reads.
        cluster_roles = {r["metadata"]["name"]: r for r in by_kind(objects, "ClusterRole")}
        for binding in by_kind(objects, "ClusterRoleBinding"):
            role = cluster_roles[binding["roleRef"]["name"]]
            for rule in role["rules"]:
                assert not set(rule["verbs"]) & WRITE_VERBS, (role["metadata"]["name"], rule)
        assert "loraplane-api" not in cluster_roles, "the API needs nothing cluster-wide"
        # The Roles are what writes to a job's objects.
        role = next(r for r in by_kind(objects, "Role") if r["metadata"]["name"] == "loraplane-operator")
        written = {res for rule in role["rules"] if set(rule["verbs"]) & WRITE_VERBS for res in rule["resources"]}
        assert {"secrets", "pods", "persistentvolumeclaims", "leases", "events"} <= written
        assert not written & {"*"}
        for rule in (r for cr in cluster_roles.values() for r in cr["rules"]):
            assert not (set(rule["resources"]) & JOB_RESOURCES and set(rule["verbs"]) & WRITE_VERBS), rule


def selects(policy, labels):
    return all(labels.get(k) == v for k, v in policy["spec"]["podSelector"]["matchLabels"].items())


@pytest.mark.parametrize("values_file", [None, *VALUES_FILES], ids=lambda p: p.name if p else "defaults")
def test_every_pod_is_selected_by_a_policy(values_file):
    """The labels a real trainer pod carries (written by the operator's
    `the_trainer_pod_labels_the_chart_checks_are_current`) and the chart's own pods, against
    every policy's selector: a pod no policy selects is a pod the network is open to."""
    objects = render(values_of(values_file))
    policies = by_kind(objects, "NetworkPolicy")
    if not policies:
        return
    trainer = json.loads((CHART / "tests" / "trainer-pod-labels.json").read_text())
    assert any(selects(p, trainer) for p in policies if p["metadata"]["name"].endswith("-trainer"))
    for dep in by_kind(objects, "Deployment"):
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert any(selects(p, labels) for p in policies), dep["metadata"]["name"]


@pytest.mark.parametrize("cidrs", [["0.0.0.0/0"], ["169.254.0.0/16", "10.0.0.0/8"]])
def test_no_policy_lets_a_pod_reach_the_metadata_endpoint(cidrs):
    objects = render({"networkPolicy": {"s3Cidrs": cidrs, "stripeCidrs": cidrs}})
    meta = ipaddress.ip_address("169.254.169.254")
    for p in by_kind(objects, "NetworkPolicy"):
        for rule in p["spec"].get("egress", []):
            for peer in rule["to"]:
                block = peer.get("ipBlock")
                if block and meta in ipaddress.ip_network(block["cidr"]):
                    assert "169.254.169.254/32" in block.get("except", []), (p["metadata"]["name"], block)
    with pytest.raises(Exception, match="metadata endpoint"):
        render({"networkPolicy": {"s3Cidrs": ["169.254.169.254/32"]}})


def test_s3_and_stripe_egress_have_no_default_and_must_be_given():
    with pytest.raises(Exception, match="networkPolicy.s3Cidrs is required"):
        render({}, required=False)
    with pytest.raises(Exception, match="networkPolicy.stripeCidrs is required"):
        render({"networkPolicy": {"s3Cidrs": ["203.0.113.0/24"]}}, required=False)
    # Only the API may call Stripe.
    for policy in by_kind(render(), "NetworkPolicy"):
        reaches_stripe = any(
            peer.get("ipBlock", {}).get("cidr") == "198.51.100.0/24"
            for rule in policy["spec"]["egress"]
            for peer in rule["to"]
        )
        assert reaches_stripe == policy["metadata"]["name"].endswith("-api"), policy["metadata"]["name"]
    objects = render({"networkPolicy": {"enabled": False}}, required=False)
    assert not by_kind(objects, "NetworkPolicy")
    for policy in by_kind(render(), "NetworkPolicy"):
        for rule in policy["spec"]["egress"]:
            for peer in rule["to"]:
                assert peer.get("ipBlock", {}).get("cidr") != "0.0.0.0/0", policy["metadata"]["name"]


NOTIFIED_TENANT = {
    "name": "shop",
    "namespace": "shop",
    "tokenSha256": "ab" * 32,
    "notifications": {"url": "https://shop.example.com/hooks", "secretRef": {"name": "shop-hooks", "key": "secret"}},
}


def test_a_tenants_notifications_reach_the_api_with_their_secret_and_egress():
    with pytest.raises(Exception, match="networkPolicy.storefrontCidrs is required"):
        render({"api": {"tenants": [NOTIFIED_TENANT]}})
    objects = render({
        "api": {"tenants": [{"name": "quiet", "namespace": "quiet", "tokenSha256": "cd" * 32}, NOTIFIED_TENANT]},
        "networkPolicy": {"storefrontCidrs": ["192.0.2.0/24"]},
    })
    config = next(c for c in by_kind(objects, "ConfigMap") if c["metadata"]["name"] == "loraplane-config")
    tenants = yaml.safe_load(config["data"]["api.yaml"])["tenants"]
    assert "notifications" not in tenants[0]
    # The config names the variable; the secret itself never is in the ConfigMap.
    assert tenants[1]["notifications"] == {"url": "https://shop.example.com/hooks", "secretEnv": "NOTIFY_SECRET_1"}
    api = next(d for d in by_kind(objects, "Deployment") if d["metadata"]["name"] == "loraplane-api")
    env = {e["name"]: e for e in api["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["NOTIFY_SECRET_1"]["valueFrom"]["secretKeyRef"] == {"name": "shop-hooks", "key": "secret"}
    # Only the API reaches the storefronts.
    for policy in by_kind(objects, "NetworkPolicy"):
        reaches = any(
            peer.get("ipBlock", {}).get("cidr") == "192.0.2.0/24"
            for rule in policy["spec"]["egress"]
            for peer in rule["to"]
        )
        assert reaches == policy["metadata"]["name"].endswith("-api"), policy["metadata"]["name"]
    # The API's Role lets it keep order ledgers (Secrets) and watch the jobs it notifies on.
    role = next(r for r in by_kind(objects, "Role") if r["metadata"]["name"] == "loraplane-api" and r["metadata"]["namespace"] == "shop")
    rules = {(tuple(r["resources"]), tuple(r["verbs"])) for r in role["rules"]}
    assert (("secrets",), ("get", "create", "update")) in rules


def test_monitoring_can_be_switched_off():
    objects = render(values_of(CHART / "ci" / "monitoring-off-values.yaml"))
    kinds = {o["kind"] for o in objects}
    assert not kinds & {"ServiceMonitor", "PrometheusRule", "NetworkPolicy"}
    assert not [c for c in by_kind(objects, "ConfigMap") if c["metadata"]["name"].endswith("-dashboard")]


def test_dashboard_is_valid_json_with_the_sidecar_label():
    objects = render()
    dash = next(c for c in by_kind(objects, "ConfigMap") if c["metadata"]["name"].endswith("-dashboard"))
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    panels = json.loads(dash["data"]["loraplane.json"])["panels"]
    titles = " ".join(p["title"] for p in panels)
    for topic in ("phase", "Queue", "GPU-hours", "Failovers", "Retention", "API latency"):
        assert topic in titles


BAD_VALUES = [
    ({"operator": {"replicas": 0}}, "replicas"),
    ({"platform": {"regions": [{"name": "mars-1", "jurisdiction": "mars"}]}}, "jurisdiction"),
    ({"api": {"tenants": [{"name": "acme", "namespace": "tenant-acme", "tokenSha256": "hunter2"}]}}, "tokenSha256"),
    ({"api": {"stripe": {"webhookSecret": "whsec_plaintext"}}}, "webhookSecret"),
    ({"s3": {"accessKeyId": "AKIA..."}}, "accessKeyId"),
    ({"api": {"plans": {"standard": {"resolution": 1000}}}}, "resolution"),
    ({"monitoring": {"prometheusRule": {"jobFailureRatio": 3}}}, "jobFailureRatio"),
]


def merge(base, patch):
    out = copy.deepcopy(base)
    for k, v in patch.items():
        out[k] = merge(out.get(k, {}), v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.mark.parametrize("patch,field", BAD_VALUES, ids=[f for _, f in BAD_VALUES])
def test_bad_values_are_rejected_naming_the_field(patch, field):
    with helm.Chart.load(str(CHART)) as chart:
        values = merge(chart.values, patch)
        with pytest.raises(Exception) as err:
            chart.validate_schema(values)
    assert field in str(err.value), str(err.value)
