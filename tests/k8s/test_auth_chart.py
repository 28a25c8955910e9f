"""API keys in the chart: the key store comes from a Secret mounted on every Ray pod (re-read by
the Ingress when it changes), the Serve config points at it, the generated admin key opens it, and
the key itself is never mounted or put in the Serve config."""

import base64
import json

import pytest
from helm_chart import CASES, by_kind, containers, pod_specs, render, serve_config, template

from deployments.auth import KeyStore
from deployments.config import HerdConfig

MOUNT = "/etc/herd/auth"


def key_secret(docs: list[dict]) -> dict:
    (secret,) = [s for s in by_kind(docs, "Secret") if s["metadata"]["labels"]["app.kubernetes.io/component"]
                 == "api-keys"]
    return secret


def herd_args(docs: list[dict]) -> dict:
    return serve_config(docs)["applications"][0]["args"]


def test_the_generated_admin_key_opens_the_mounted_key_store(renders, tmp_path):
    docs = renders["default"]
    secret = key_secret(docs)
    admin_key = base64.b64decode(secret["data"]["admin-key"]).decode()
    store = tmp_path / "keys.json"
    store.write_bytes(base64.b64decode(secret["data"]["keys.json"]))
    principal = KeyStore(str(store)).lookup(admin_key)
    assert principal is not None and principal.admin and principal.tenant == "admin"
    assert admin_key not in store.read_text()  # the store holds the hash only
    cfg = HerdConfig.model_validate(herd_args(docs))
    assert cfg.auth.enabled and cfg.auth.keys_file == f"{MOUNT}/keys.json"


@pytest.mark.parametrize("case", CASES)
def test_every_ray_pod_mounts_only_the_key_store(renders, case):
    docs = renders[case]
    name = "my-api-keys" if case == "existing-secrets" else key_secret(docs)["metadata"]["name"]
    for where, spec in pod_specs(docs):
        if "StatefulSet" in where:  # Redis
            assert not [v for v in spec["volumes"] if v["name"] == "api-keys"]
            continue
        (volume,) = [v for v in spec["volumes"] if v["name"] == "api-keys"]
        assert volume["secret"]["secretName"] == name, where
        assert volume["secret"]["items"] == [{"key": "keys.json", "path": "keys.json"}], where  # not admin-key
        (ray,) = [c for c in containers(spec) if any(m["name"] == "api-keys" for m in c.get("volumeMounts", []))]
        (mount,) = [m for m in ray["volumeMounts"] if m["name"] == "api-keys"]
        assert mount == {"name": "api-keys", "mountPath": MOUNT, "readOnly": True}, where  # no subPath: updates arrive


def test_an_existing_secret_is_mounted_and_none_is_made(helm):
    docs = render("--set", "auth.existingSecret=tenant-keys", "--set", "auth.existingSecretKey=store.json")
    assert not [s for s in by_kind(docs, "Secret") if "api-keys" in s["metadata"]["name"]]
    for where, spec in pod_specs(docs):
        for volume in spec["volumes"]:
            if volume["name"] == "api-keys":
                assert volume["secret"]["secretName"] == "tenant-keys", where
                assert volume["secret"]["items"] == [{"key": "store.json", "path": "keys.json"}], where
    assert herd_args(docs)["auth"] == {"keys_file": f"{MOUNT}/keys.json"}


def test_auth_off_mounts_nothing_and_says_so(helm):
    docs = render("--set", "auth.enabled=false", "--set", "auth.sharedAnonymousCache=true")
    assert not [s for s in by_kind(docs, "Secret") if "api-keys" in s["metadata"]["name"]]
    assert not [v for _, spec in pod_specs(docs) for v in spec["volumes"] if v["name"] == "api-keys"]
    assert herd_args(docs)["auth"] == {"enabled": False, "shared_anonymous_cache": True}
    assert not HerdConfig.model_validate(herd_args(docs)).auth.enabled


@pytest.mark.parametrize("args, where", [
    (["--set", "auth.enabled=yes"], "/auth/enabled"),
    (["--set", "auth.existingSecretKey="], "/auth/existingSecretKey"),
    (["--set", "auth.keys=abc"], "'keys' not allowed"),
])
def test_bad_auth_values_are_refused(helm, args, where):
    out = template(*args)
    assert out.returncode != 0 and where in out.stderr, out.stderr


def test_the_admin_key_appears_only_in_its_secret(renders):
    docs = renders["default"]
    admin_key = base64.b64decode(key_secret(docs)["data"]["admin-key"]).decode()
    for doc in docs:
        if doc is not key_secret(docs):
            assert admin_key not in json.dumps(doc), f"{doc['kind']}/{doc['metadata']['name']}"
