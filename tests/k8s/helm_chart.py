"""Render the Herd Helm chart with a real helm binary and walk the manifests it produces."""

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "k8s" / "herd"
RELEASE = "herd"
NAMESPACE = "herd"

# The values profiles shipped with the chart: name -> extra helm arguments.
PROFILES = {
    "default": [],
    "single-gpu": ["-f", str(CHART_DIR / "values-single-gpu.yaml")],
    "multinode": ["-f", str(CHART_DIR / "values-multinode.yaml")],
}

# Profiles plus option combinations, so every template branch is rendered and validated.
CASES = {
    **PROFILES,
    "options": [
        "--set", "monitoring.serviceMonitor.enabled=true",
        "--set", "redis.persistence.enabled=true",
        "--set", "redis.persistence.storageClass=fast",
        "--set", "head.mountModel=true",
        "--set", "model.source=pvc",
        "--set", "model.pvc.claimName=herd-models",
        "--set", "routerService.autoscaling.enabled=true",
        "--set", "autoscaler.version=v2",
        "--set", "imagePullSecrets[0].name=regcred",
        "--set", "networkPolicy.metricsFrom[0].namespaceSelector.matchLabels.name=monitoring",
        "--set", "networkPolicy.clients[0].namespaceSelector.matchLabels.team=apps",
        "--set", "networkPolicy.dashboardFrom[0].podSelector.matchLabels.role=admin",
        "--set", "dashboard.service=true",
        "--set", "raySecurityContext.tmpSizeLimit=50Gi",
    ],
    "existing-secrets": [
        "--set", "rayAuth.existingSecret=my-ray-token",
        "--set", "redis.cacheSecret.existingSecret=my-cache-secret",
        "--set", "redis.cacheSecret.existingSecretKey=key",
        "--set", "redis.auth.existingSecret=my-redis-auth",
        "--set", "auth.existingSecret=my-api-keys",
    ],
    "opted-out": [
        "--set", "rayAuth.enabled=false",
        "--set", "networkPolicy.enabled=false",
        "--set", "raySecurityContext.readOnlyRootFilesystem=false",
        "--set", "autoscaler.enabled=false",
    ],
    "external-redis": [
        "-f", str(CHART_DIR / "values-multinode.yaml"),
        "--set", "redis.deploy=false",
        "--set", "redis.external.url=rediss://redis.example.internal:6380/0",
        "--set", "redis.auth.existingSecret=herd-redis-auth",
    ],
}


def helm_path() -> Path:
    """The helm binary: $HERD_HELM, else .tools/bin/helm (made by k8s/tools/fetch-helm.sh)."""
    return Path(os.environ.get("HERD_HELM", REPO_ROOT / ".tools" / "bin" / "helm"))


def run_helm(*args: str) -> subprocess.CompletedProcess:
    """Run helm offline (no repositories, no cluster) and capture its output."""
    env = {**os.environ, "HELM_CACHE_HOME": "/tmp/herd-helm/cache",
           "HELM_CONFIG_HOME": "/tmp/herd-helm/config", "HELM_DATA_HOME": "/tmp/herd-helm/data"}
    return subprocess.run([str(helm_path()), *args], capture_output=True, text=True,
                          env=env, timeout=60)


def template(*args: str) -> subprocess.CompletedProcess:
    return run_helm("template", RELEASE, str(CHART_DIR), "--namespace", NAMESPACE, *args)


def render(*args: str) -> list[dict]:
    """`helm template` the chart and return its manifests; fail with helm's message."""
    result = template(*args)
    if result.returncode != 0:
        raise AssertionError(f"helm template {' '.join(args)} failed:\n{result.stderr}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [doc for doc in docs if doc["kind"] == kind]


def rayservice(docs: list[dict]) -> dict:
    (doc,) = by_kind(docs, "RayService")
    return doc


def serve_config(docs: list[dict]) -> dict:
    return yaml.safe_load(rayservice(docs)["spec"]["serveConfigV2"])


def pod_specs(docs: list[dict]) -> Iterator[tuple[str, dict]]:
    """(where, pod spec) for every pod template: workloads and the RayService groups."""
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in ("StatefulSet", "Deployment", "DaemonSet", "Job"):
            yield name, doc["spec"]["template"]["spec"]
        elif doc["kind"] == "RayService":
            cluster = doc["spec"]["rayClusterConfig"]
            yield f"{name}/head", cluster["headGroupSpec"]["template"]["spec"]
            for group in cluster.get("workerGroupSpecs", []):
                yield f"{name}/{group['groupName']}", group["template"]["spec"]


def containers(pod_spec: dict) -> list[dict]:
    return pod_spec.get("initContainers", []) + pod_spec["containers"]
