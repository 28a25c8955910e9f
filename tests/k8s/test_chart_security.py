"""Secrets stay in Secrets; pods run as non-root with requests, limits and probes."""

import base64

import pytest
import yaml
from helm_chart import CASES, CHART_DIR, PROFILES, by_kind, containers, pod_specs, render, serve_config

PASSWORD = "pw-7f3c9e1d-not-in-any-configmap"
RAY_UID, REDIS_UID = 1000, 999


def secret(docs: list[dict], name: str) -> dict:
    (found,) = [s for s in by_kind(docs, "Secret") if s["metadata"]["name"] == name]
    return found


def env_refs(docs: list[dict]) -> dict[str, set[tuple[str, str]]]:
    """env name -> the (Secret, key) pairs it is read from, over every container."""
    refs: dict[str, set[tuple[str, str]]] = {}
    for _, spec in pod_specs(docs):
        for c in containers(spec):
            for env in c.get("env", []):
                if "valueFrom" in env:
                    ref = env["valueFrom"]["secretKeyRef"]
                    refs.setdefault(env["name"], set()).add((ref["name"], ref["key"]))
    return refs


def test_password_appears_only_inside_the_secret(helm):
    docs = render("--set", f"redis.auth.password={PASSWORD}")
    for doc in docs:
        if doc["kind"] != "Secret":
            assert PASSWORD not in yaml.safe_dump(doc), f"{doc['kind']}/{doc['metadata']['name']}"
    assert base64.b64decode(secret(docs, "herd-redis")["data"]["password"]).decode() == PASSWORD


def test_generated_secrets_are_long_and_random(renders):
    docs = renders["default"]
    for name, key in (("herd-redis", "password"), ("herd-cache-secret", "secret"), ("herd-ray-token", "auth_token")):
        assert len(base64.b64decode(secret(docs, name)["data"][key])) >= 32, name
    assert {s["metadata"]["name"] for s in by_kind(docs, "Secret")} == {"herd-redis", "herd-cache-secret",
                                                                        "herd-ray-token", "herd-api-keys"}


@pytest.mark.parametrize("case", CASES)
def test_generated_secret_values_appear_only_inside_their_secret(renders, case):
    values = {base64.b64decode(v).decode() for s in by_kind(renders[case], "Secret") for v in s["data"].values()}
    for doc in renders[case]:
        if doc["kind"] != "Secret":
            text = yaml.safe_dump(doc)
            assert not [v for v in values if v in text], f"{doc['kind']}/{doc['metadata']['name']}"


def test_existing_secret_is_used_and_none_is_made(renders):
    docs = renders["external-redis"]
    assert "herd-redis" not in {s["metadata"]["name"] for s in by_kind(docs, "Secret")}
    assert env_refs(docs)["REDIS_PASSWORD"] == {("herd-redis-auth", "password")}


def test_existing_secrets_are_used_and_none_is_made(renders):
    docs = renders["existing-secrets"]
    assert not by_kind(docs, "Secret")
    refs = env_refs(docs)
    assert refs["REDIS_PASSWORD"] == {("my-redis-auth", "password")}
    assert refs["HERD_CACHE_SECRET"] == {("my-cache-secret", "key")}
    auth = by_kind(docs, "RayService")[0]["spec"]["rayClusterConfig"]["authOptions"]
    assert auth == {"mode": "token", "secretName": "my-ray-token"}


@pytest.mark.parametrize("case", CASES)
def test_the_cache_secret_reaches_the_replicas_by_name_only(renders, case):
    redis = serve_config(renders[case])["applications"][0]["args"]["redis"]
    assert redis["secret_env"] == "HERD_CACHE_SECRET" and "secret_file" not in redis
    expected = ("my-cache-secret", "key") if case == "existing-secrets" else ("herd-cache-secret", "secret")
    assert env_refs(renders[case])["HERD_CACHE_SECRET"] == {expected}
    ray_containers = [c for where, spec in pod_specs(renders[case]) if "RayService" in where
                      for c in spec["containers"]]
    assert all("HERD_CACHE_SECRET" in {e["name"] for e in c["env"]} for c in ray_containers)


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
                if "PASSWORD" in env["name"] or env["name"] in ("REDISCLI_AUTH", "HERD_CACHE_SECRET", "RAY_AUTH_TOKEN"):
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


@pytest.mark.parametrize("case", CASES)
def test_ray_token_authentication_from_a_secret(renders, case):
    cluster = by_kind(renders[case], "RayService")[0]["spec"]["rayClusterConfig"]
    if case == "opted-out":
        assert "authOptions" not in cluster
        return
    name = "my-ray-token" if case == "existing-secrets" else "herd-ray-token"
    assert cluster["authOptions"] == {"mode": "token", "secretName": name}
    if case != "existing-secrets":
        assert set(secret(renders[case], name)["data"]) == {"auth_token"}  # the key KubeRay reads


@pytest.mark.parametrize("case", CASES)
def test_the_dashboard_is_not_exposed_by_default(renders, case):
    services = by_kind(renders[case], "Service")
    exposing = [s for s in services if any(p["port"] == 8265 for p in s["spec"]["ports"])]
    if case == "options":  # dashboard.service=true: a ClusterIP Service, still behind the policy
        assert [s["spec"]["type"] for s in exposing] == ["ClusterIP"]
    else:
        assert not exposing
    for s in services:  # whatever services.type is, only the Serve ports leave the cluster
        if s["spec"].get("type") in ("NodePort", "LoadBalancer"):
            assert {p["port"] for p in s["spec"]["ports"]} <= {8000, 9000}


@pytest.mark.parametrize("case", CASES)
def test_service_account_tokens_only_where_used(renders, case):
    cluster = by_kind(renders[case], "RayService")[0]["spec"]["rayClusterConfig"]
    for where, spec in pod_specs(renders[case]):
        if where.endswith("/head") and cluster["enableInTreeAutoscaling"]:
            assert "automountServiceAccountToken" not in spec, where  # the autoscaler sidecar calls the API
        else:
            assert spec["automountServiceAccountToken"] is False, where


@pytest.mark.parametrize("case", CASES)
def test_read_only_root_filesystems_with_writable_scratch(renders, case):
    for where, spec in pod_specs(renders[case]):
        volumes = {v["name"]: v for v in spec["volumes"]}
        for c in spec["containers"]:
            read_only = c["securityContext"].get("readOnlyRootFilesystem")
            assert read_only is (case != "opted-out" or c["name"] == "redis"), (where, c["name"])
            if c["name"] == "redis":
                continue
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            for path in ("/tmp", "/home/ray/.cache", "/dev/shm"):  # Ray's session dir is /tmp/ray
                assert "emptyDir" in volumes[mounts[path]], (where, path)
            if case == "options":
                assert volumes[mounts["/tmp"]]["emptyDir"] == {"sizeLimit": "50Gi"}
            if read_only:  # JIT caches that would default to the read-only $HOME
                env = {e["name"]: e.get("value", "") for e in c["env"]}
                assert all(env[n].startswith("/home/ray/.cache/") for n in ("CUDA_CACHE_PATH", "TRITON_CACHE_DIR"))
