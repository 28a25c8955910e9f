"""Secrets stay in Secrets; pods run as non-root with requests, limits and probes."""

import base64

import pytest
import yaml
from helm_chart import CASES, CHART_DIR, PROFILES, by_kind, containers, pod_specs, render, serve_config

PASSWORD = "pw-7f3c9e1d-not-in-any-configmap"
RAY_UID, REDIS_UID = 1000, 999


def redis_secrets(docs: list[dict]) -> list[dict]:
    """The Secrets of the Redis password (the API keys have one of their own: test_auth_chart.py)."""
    return [s for s in by_kind(docs, "Secret") if s["metadata"]["labels"]["app.kubernetes.io/component"] == "redis"]


def test_password_appears_only_inside_the_secret(helm):
    docs = render("--set", f"redis.auth.password={PASSWORD}")
    for doc in docs:
        if doc["kind"] != "Secret":
            assert PASSWORD not in yaml.safe_dump(doc), f"{doc['kind']}/{doc['metadata']['name']}"
    (secret,) = redis_secrets(docs)
    assert base64.b64decode(secret["data"]["password"]).decode() == PASSWORD


def test_generated_password_is_long_and_random(renders):
    (secret,) = redis_secrets(renders["default"])
    assert len(base64.b64decode(secret["data"]["password"])) >= 32


def test_existing_secret_is_used_and_none_is_made(renders):
    docs = renders["external-redis"]
    assert not redis_secrets(docs)
    refs = {env["valueFrom"]["secretKeyRef"]["name"] for _, spec in pod_specs(docs)
            for c in containers(spec) for env in c.get("env", []) if "valueFrom" in env}
    assert refs == {"herd-redis-auth"}


@pytest.mark.parametrize("profile", PROFILES)
def test_values_files_hold_no_secret(profile):
    path = CHART_DIR / ("values.yaml" if profile == "default" else f"values-{profile}.yaml")
    values = yaml.safe_load(path.read_text())
    assert not values.get("redis", {}).get("auth", {}).get("password")


@pytest.mark.parametrize("case", CASES)
def test_redis_password_reaches_pods_only_through_secret_refs(renders, case):
    config = serve_config(renders[case])
    env_vars = config["applications"][0]["runtime_env"]["env_vars"]
    assert not [k for k in env_vars if any(w in k.upper() for w in ("PASSWORD", "SECRET", "TOKEN"))]
    for where, spec in pod_specs(renders[case]):
        for c in containers(spec):
            for env in c.get("env", []):
                if "PASSWORD" in env["name"] or env["name"] == "REDISCLI_AUTH":
                    assert "value" not in env and "secretKeyRef" in env["valueFrom"], where
    for cm in by_kind(renders[case], "ConfigMap"):
        assert "requirepass" not in yaml.safe_dump(cm["data"])


@pytest.mark.parametrize("case", CASES)
def test_pods_run_as_non_root(renders, case):
    for where, spec in pod_specs(renders[case]):
        context = spec["securityContext"]
        assert context["runAsNonRoot"] is True, where
        assert context["runAsUser"] == (REDIS_UID if "StatefulSet" in where else RAY_UID), where
        for c in containers(spec):
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, (where, c["name"])
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], (where, c["name"])


@pytest.mark.parametrize("case", CASES)
def test_every_container_has_requests_and_limits(renders, case):
    for where, spec in pod_specs(renders[case]):
        for c in containers(spec):
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][bound]), (where, c["name"], bound)
    cluster = by_kind(renders[case], "RayService")[0]["spec"]["rayClusterConfig"]
    if cluster["enableInTreeAutoscaling"]:  # the autoscaler sidecar KubeRay adds to the head
        assert set(cluster["autoscalerOptions"]["resources"]) == {"requests", "limits"}


@pytest.mark.parametrize("case", CASES)
def test_gpus_only_on_workers(renders, case):
    for where, spec in pod_specs(renders[case]):
        (main,) = spec["containers"]
        limits, requests = main["resources"]["limits"], main["resources"]["requests"]
        if main["name"] == "ray-worker":
            assert int(limits["nvidia.com/gpu"]) >= 1 and limits["nvidia.com/gpu"] == requests["nvidia.com/gpu"]
            assert spec["tolerations"], where
        else:
            assert "nvidia.com/gpu" not in limits, where


@pytest.mark.parametrize("case", CASES)
def test_probes_on_ray_and_redis_containers(renders, case):
    checks = {"ray-head": "gcs_healthz", "ray-worker": "/-/healthz", "redis": "PONG"}
    seen = set()
    for where, spec in pod_specs(renders[case]):
        for c in spec["containers"]:
            assert "readinessProbe" in c and "livenessProbe" in c, (where, c["name"])
            assert checks[c["name"]] in " ".join(c["readinessProbe"]["exec"]["command"])
            seen.add(c["name"])
    assert seen == set(checks) - ({"redis"} if case == "external-redis" else set())


@pytest.mark.parametrize("case", CASES)
def test_shm_and_read_only_model_volume(renders, case):
    for where, spec in pod_specs(renders[case]):
        if "RayService" not in where:
            continue
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
        mounts = {m["name"]: m for m in spec["containers"][0]["volumeMounts"]}
        assert mounts["dshm"]["mountPath"] == "/dev/shm"
        if "model" in mounts:
            assert mounts["model"]["readOnly"] is True
            claim = volumes["model"].get("persistentVolumeClaim")
            assert claim is None or claim["readOnly"] is True
        else:
            assert where.endswith("/head"), f"{where}: GPU workers need the model volume"
