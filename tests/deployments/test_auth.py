"""API keys and tenancy without a cluster (deployments/auth.py): the key store, its reload, and
which cache namespace each request gets."""

from __future__ import annotations

import json
import os
import stat

import pytest

from deployments.auth import (
    Authenticator,
    AuthError,
    KeyStore,
    KeyStoreError,
    TenantForbidden,
    add_key,
    bearer_token,
    read_key_file,
    revoke_key,
)
from deployments.config import AuthConfig, HerdConfig


@pytest.fixture
def store(tmp_path):
    return tmp_path / "keys.json"


def test_the_store_keeps_hashes_only_and_is_private(store):
    key, record = add_key(store, "acme")
    text = store.read_text()
    assert key not in text and record.sha256 in text and record.id in key
    assert stat.S_IMODE(os.stat(store).st_mode) == 0o600
    assert read_key_file(store) == [record]


def test_a_key_opens_its_tenant_and_nothing_else_does(store):
    key, record = add_key(store, "acme")
    keys = KeyStore(str(store))
    assert keys.lookup(key).tenant == "acme"
    forged = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")  # right id, wrong secret
    for bad in (forged, "", "herd_", key + "x", record.sha256, key.replace("herd_", "herd-")):
        assert keys.lookup(bad) is None, bad


def test_added_and_revoked_keys_take_effect_without_a_restart(store):
    first, record = add_key(store, "acme")
    keys = KeyStore(str(store))
    second, _ = add_key(store, "globex")
    assert keys.lookup(second).tenant == "globex"  # re-read on change
    revoke_key(store, record.id)
    assert keys.lookup(first) is None
    with pytest.raises(KeyStoreError, match="no key"):
        revoke_key(store, record.id)


def test_a_broken_rewrite_keeps_the_last_good_keys(store):
    key, _ = add_key(store, "acme")
    keys = KeyStore(str(store))
    store.write_text("{not json")
    assert keys.lookup(key).tenant == "acme"


def test_keys_from_an_environment_variable(store, monkeypatch):
    key, _ = add_key(store, "acme")
    monkeypatch.setenv("HERD_KEYS_TEST", store.read_text())
    assert KeyStore(keys_env="HERD_KEYS_TEST").lookup(key).tenant == "acme"


@pytest.mark.parametrize("content, problem", [
    ("[]", "not a herd key store"),
    (json.dumps({"keys": [{"id": "a", "tenant": "t", "sha256": "xyz"}]}), "malformed"),
])
def test_a_bad_store_is_named(store, content, problem):
    store.write_text(content)
    with pytest.raises(KeyStoreError, match=problem):
        KeyStore(str(store))


def test_auth_on_without_keys_is_refused():
    with pytest.raises(KeyStoreError, match="auth.keys_file"):
        Authenticator.from_config(AuthConfig())
    assert HerdConfig(model="m").auth.enabled  # on by default


def test_bad_tenant_names_are_refused(store):
    for name in ("", "a b", "x" * 65, "../etc", "\udcff"):
        with pytest.raises(KeyStoreError, match="tenant name"):
            add_key(store, name)


def test_bearer_header_parsing():
    assert bearer_token("Bearer abc") == "abc" and bearer_token("bearer  abc ") == "abc"
    assert bearer_token(None) is None and bearer_token("Basic abc") is None and bearer_token("Bearer ") is None


def test_with_auth_the_key_decides_the_tenant(store):
    key, _ = add_key(store, "acme")
    admin, _ = add_key(store, "ops", admin=True)
    auth = Authenticator.from_config(AuthConfig(keys_file=str(store)))
    with pytest.raises(AuthError, match="missing API key: send H"):
        auth.principal(None, "H")
    with pytest.raises(AuthError, match="invalid API key"):
        auth.principal("Bearer herd_000000000000_" + "A" * 43, "H")
    acme = auth.principal(f"Bearer {key}", "H")
    assert auth.cache_salt(acme, "", "tenant") == "tenant:acme"
    assert auth.cache_salt(acme, "acme", "tenant") == "tenant:acme"
    assert auth.cache_salt(acme, "", "x-herd-tenant", user="globex") == "tenant:acme"  # `user` is no tenant
    with pytest.raises(TenantForbidden, match="x-herd-tenant names tenant 'globex'.*'acme'"):
        auth.cache_salt(acme, "globex", "x-herd-tenant")
    ops = auth.principal(f"Bearer {admin}", "H")
    assert auth.cache_salt(ops, "globex", "tenant") == "tenant:globex"  # the admin key may act for a tenant
    assert auth.cache_salt(ops, "", "tenant") == "tenant:ops"


def test_without_auth_anonymous_requests_share_nothing_unless_opted_in():
    auth = Authenticator.from_config(AuthConfig(enabled=False))
    assert auth.principal(None, "H") is None
    salts = {auth.cache_salt(None, "", "tenant") for _ in range(3)}
    assert len(salts) == 3 and all(s.startswith("anon:") for s in salts)
    assert auth.cache_salt(None, "acme", "tenant") == auth.cache_salt(None, "", "x", user="acme") == "tenant:acme"
    shared = Authenticator.from_config(AuthConfig(enabled=False, shared_anonymous_cache=True))
    assert shared.cache_salt(None, "", "tenant") == shared.cache_salt(None, "", "tenant") == ""
