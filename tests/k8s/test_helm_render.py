"""`helm lint` / `helm template` per values profile; built-in kinds validate against Kubernetes."""

import kubernetes_validate
import pytest
from helm_chart import CASES, CHART_DIR, PROFILES, by_kind, pod_specs, run_helm

# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schema shipped.
K8S_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
BUILTIN_KINDS = {"Secret", "ConfigMap", "Service", "StatefulSet", "NetworkPolicy"}
MONITORING_KINDS = {"ServiceMonitor", "PodMonitor"}


@pytest.mark.parametrize("profile", PROFILES)
def test_helm_lint_passes(helm, profile):
    result = run_helm("lint", str(CHART_DIR), "--strict", *PROFILES[profile])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("case", CASES)
def test_renders_the_expected_objects(renders, case):
    kinds = {doc["kind"] for doc in renders[case]}
    assert "RayService" in kinds
    assert kinds <= BUILTIN_KINDS | MONITORING_KINDS | {"RayService"}
    redis_deployed = case != "external-redis"
    assert bool(by_kind(renders[case], "StatefulSet")) == redis_deployed


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("case", CASES)
def test_builtin_kinds_validate_strictly(renders, case, version):
    for doc in renders[case]:
        if doc["kind"] in BUILTIN_KINDS:
            kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("case", CASES)
def test_ray_pod_templates_validate_strictly(renders, case):
    """The RayService embeds pod templates; check them as core/v1 PodTemplates too."""
    for where, spec in pod_specs(renders[case]):
        if not where.startswith("RayService/"):
            continue
        doc = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
               "template": {"spec": spec}}
        kubernetes_validate.validate(doc, K8S_VERSIONS[0], strict=True)


def test_monitors_select_the_ray_metrics_ports(renders):
    """No Prometheus Operator CRDs offline: check the selectors and ports by hand."""
    for case, kind in (("multinode", "PodMonitor"), ("options", "ServiceMonitor")):
        (monitor,) = by_kind(renders[case], kind)
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        selector = monitor["spec"]["selector"]["matchLabels"]
        endpoints = monitor["spec"].get("podMetricsEndpoints") or monitor["spec"]["endpoints"]
        assert [e["port"] for e in endpoints] == ["metrics"]
        targets = _ray_pod_labels(renders[case]) if kind == "PodMonitor" else [
            svc["metadata"]["labels"] for svc in by_kind(renders[case], "Service")]
        assert any(selector.items() <= labels.items() for labels in targets)
    assert not by_kind(renders["default"], "PodMonitor") + by_kind(renders["default"], "ServiceMonitor")


def _ray_pod_labels(docs):
    cluster = by_kind(docs, "RayService")[0]["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [group["template"]["metadata"]["labels"] for group in groups]
