"""The rendered RayService against KubeRay's CRD schema (ray.io/v1) from /work/shared/k8s."""

from pathlib import Path

import jsonschema
import pytest
import yaml
from helm_chart import CASES, rayservice

CRD_PATH = Path("/work/shared/k8s/ray.io_rayservices.yaml")


@pytest.fixture(scope="module")
def crd_schema() -> dict:
    crd = yaml.safe_load(CRD_PATH.read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return v1["schema"]["openAPIV3Schema"]


@pytest.mark.parametrize("case", CASES)
def test_rayservice_validates_against_crd(renders, crd_schema, case):
    doc = rayservice(renders[case])
    assert doc["apiVersion"] == "ray.io/v1"
    jsonschema.Draft7Validator(crd_schema).validate(doc)


@pytest.mark.parametrize("case", CASES)
def test_rayservice_has_no_field_the_api_server_would_prune(renders, crd_schema, case):
    """Structural CRDs silently drop unknown fields; a typo must fail here instead."""
    unknown = list(_unknown_fields(rayservice(renders[case]), crd_schema, ""))
    assert not unknown, f"fields not in the RayService CRD: {unknown}"


def _unknown_fields(value, schema: dict, path: str):
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return
    if isinstance(value, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            if props is not None and key in props:
                yield from _unknown_fields(item, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                yield from _unknown_fields(item, extra, f"{path}.{key}")
            elif props is not None:
                yield f"{path}.{key}"
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            yield from _unknown_fields(item, schema["items"], f"{path}[{i}]")


def test_autoscaling_and_gpu_groups(renders):
    cluster = rayservice(renders["multinode"])["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["minReplicas"] >= 2, "multinode spreads shards over several nodes"
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert ports["dashboard"] == 8265 and ports["metrics"] == 8080
    single = rayservice(renders["single-gpu"])["spec"]["rayClusterConfig"]
    assert single["enableInTreeAutoscaling"] is False
