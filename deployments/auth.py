"""API keys and tenants: who a request is, and which prefix-cache namespace (cache salt) it gets.

Keys. A key is `herd_<id>_<secret>`: a public id (12 hex digits, what `herd keys list` shows and
`herd keys revoke` takes) and 256 random bits. The key store holds, per key, its id, its tenant,
whether it is the admin key and the SHA-256 of the whole key, never the key itself: a hash of a
high-entropy random key is enough (no salt or slow hash is needed, there is nothing to guess).
A presented key is looked up by its id and its hash compared with `hmac.compare_digest`.

The key store is JSON, `{"keys": [{"id", "tenant", "sha256", "admin", "created"}, ...]}`, read from
a file (`auth.keys_file`: herd up's `$HERD_HOME/keys.json`, or a Kubernetes Secret mounted as a
directory) or an environment variable (`auth.keys_env`). The file is read again whenever it
changes (checked on every request by its stat: keys added or revoked take effect at once, with no
redeploy); a file that cannot be read or parsed any more keeps the last good keys (logged).

Tenancy. With auth on, a request's tenant is its key's tenant, never what the request says: a
gRPC `tenant` or `x-herd-tenant` naming another tenant is refused (403 / PERMISSION_DENIED) unless
the key is an admin key, which may act for any tenant; the OpenAI `user` field (an end-user label
in OpenAI's API) is ignored for tenancy. With auth off the tenant is self-asserted (gRPC `tenant`,
`x-herd-tenant`, else `user`), and a request that names none is anonymous: it gets a salt of its
own (no prefix-cache hits across requests, in either tier) unless `auth.shared_anonymous_cache`.
Namespaces cannot meet: a tenant's salt is `tenant:<name>`, an anonymous request's `anon:<random>`
(whose chunks the shared tier neither looks up nor stores: nobody could read them).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

KEY_PREFIX = "herd_"
KEY_ID_HEX = 12
TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
ADMIN_TENANT = "admin"
PRIVATE_SALT_PREFIX = "anon:"  # + a random id: one anonymous request's cache namespace
RACY_S = 2.0  # a key file changed this recently is read again on every lookup
_KEY_SHAPE = re.compile(rf"{KEY_PREFIX}([0-9a-f]{{{KEY_ID_HEX}}})_[A-Za-z0-9_-]{{20,}}")


class AuthError(Exception):
    """A request without a valid API key (401 / UNAUTHENTICATED)."""


class TenantForbidden(Exception):
    """A request naming a tenant that its key does not belong to (403 / PERMISSION_DENIED)."""


class KeyStoreError(ValueError):
    """A key store that cannot be read, or a key-store change that cannot be made."""


@dataclass(frozen=True)
class KeyRecord:
    id: str
    tenant: str
    sha256: str  # hex SHA-256 of the whole key
    admin: bool = False
    created: str = ""  # ISO 8601, UTC


@dataclass(frozen=True)
class Principal:
    """Who sent a request: the key's id and tenant."""

    key_id: str
    tenant: str
    admin: bool = False


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def check_tenant_name(tenant: str) -> str:
    if not TENANT_NAME.fullmatch(tenant):
        raise KeyStoreError(f"tenant name {tenant!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a "
                            "letter or digit")
    return tenant


def new_key(tenant: str, admin: bool = False) -> tuple[str, KeyRecord]:
    """A fresh random key for `tenant` and its record (the only place the key exists in clear)."""
    key_id = secrets.token_hex(KEY_ID_HEX // 2)
    key = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return key, KeyRecord(key_id, check_tenant_name(tenant), key_digest(key), admin, created)


def parse_records(text: str, where: str) -> dict[str, KeyRecord]:
    """id -> record from the key store's JSON; KeyStoreError naming `where` and the problem."""
    try:
        data = json.loads(text)
        entries = data["keys"]
        records = [KeyRecord(**{k: e[k] for k in ("id", "tenant", "sha256", "admin", "created") if k in e})
                   for e in entries]
    except (ValueError, KeyError, TypeError) as e:
        raise KeyStoreError(f"{where} is not a herd key store ({{\"keys\": [{{\"id\", \"tenant\", \"sha256\", "
                            f"\"admin\"}}, ...]}}): {type(e).__name__}: {e}") from None
    for r in records:
        if not (isinstance(r.id, str) and isinstance(r.tenant, str) and isinstance(r.sha256, str)
                and re.fullmatch(r"[0-9a-f]{64}", r.sha256) and isinstance(r.admin, bool)):
            raise KeyStoreError(f"{where}: key {r.id!r} is malformed (sha256 must be 64 hex digits, admin a boolean)")
    return {r.id: r for r in records}


def dump_records(records: list[KeyRecord]) -> str:
    return json.dumps({"keys": [asdict(r) for r in records]}, indent=2) + "\n"


# ---- the key file, as `herd keys` and `herd up` change it ------------------------------------------

def read_key_file(path: Path) -> list[KeyRecord]:
    """The records of the key file at `path`; none when it does not exist."""
    if not path.exists():
        return []
    return list(parse_records(path.read_text(), str(path)).values())


def write_key_file(path: Path, records: list[KeyRecord]) -> None:
    """Replace the key file atomically (readers see the old or the new file, never half of one), 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(dump_records(records))
    tmp.replace(path)


def add_key(path: Path, tenant: str, admin: bool = False) -> tuple[str, KeyRecord]:
    """Make a key for `tenant`, add its hash to the key file; the key (shown once) and its record."""
    key, record = new_key(tenant, admin)
    write_key_file(path, [*read_key_file(path), record])
    return key, record


def revoke_key(path: Path, key_id: str) -> KeyRecord:
    """Remove the key `key_id` from the key file; its record. KeyStoreError if there is none."""
    records = read_key_file(path)
    gone = [r for r in records if r.id == key_id]
    if not gone:
        raise KeyStoreError(f"no key {key_id!r} in {path} (`herd keys list` shows the ids)")
    write_key_file(path, [r for r in records if r.id != key_id])
    return gone[0]


# ---- the key store the Ingress reads -----------------------------------------------------------

class KeyStore:
    """The keys a server accepts, from a file (re-read when it changes) and/or an environment variable."""

    def __init__(self, keys_file: str | None = None, keys_env: str | None = None):
        if not keys_file and not keys_env:
            raise KeyStoreError("auth is on but no keys are configured: set auth.keys_file (a key store that "
                                "`herd keys add` writes) or auth.keys_env, or auth.enabled: false")
        self.path = Path(keys_file).expanduser() if keys_file else None
        self._stat: tuple | None = None
        self._text: str | None = None
        self._file: dict[str, KeyRecord] = {}
        self._env: dict[str, KeyRecord] = {}
        if keys_env:
            text = os.environ.get(keys_env)
            if text is None:
                raise KeyStoreError(f"auth.keys_env names {keys_env}, which is not set")
            self._env = parse_records(text, f"${keys_env}")
        if self.path is not None:
            if not self.path.is_file():
                raise KeyStoreError(f"auth.keys_file {self.path} does not exist (`herd keys add --keys-file "
                                    f"{self.path} --tenant NAME` makes it)")
            self._refresh(strict=True)

    def _refresh(self, strict: bool = False) -> None:
        """Re-read the file when its stat changed (a Kubernetes Secret update swaps a symlink: stat
        follows it), or while it is younger than RACY_S: file times are coarse (a few ms), so two
        writes in a row can leave the same stat (git's "racy" files)."""
        if self.path is None:
            return
        try:
            st = self.path.stat()
            stat = (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino, st.st_dev)
            if stat == self._stat and time.time() - st.st_ctime > RACY_S:
                return
            text = self.path.read_text()
            if text != self._text:
                self._file = parse_records(text, str(self.path))
                self._text = text
                log.log(logging.DEBUG if strict else logging.INFO, "API keys: %d loaded from %s", len(self._file),
                        self.path)
            self._stat = stat
        except (OSError, KeyStoreError) as e:
            if strict:
                raise KeyStoreError(str(e)) from None
            log.error("API keys: cannot re-read %s (%s); keeping the %d keys read before", self.path, e,
                      len(self._file))

    def lookup(self, key: str) -> Principal | None:
        m = _KEY_SHAPE.fullmatch(key)
        if m is None:
            return None
        self._refresh()
        record = self._file.get(m.group(1)) or self._env.get(m.group(1))
        if record is None or not hmac.compare_digest(key_digest(key), record.sha256):
            return None
        return Principal(record.id, record.tenant, record.admin)


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` value; None when absent or another scheme."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


class Authenticator:
    """What the Ingress asks: who sent this (`principal`) and which cache namespace it gets (`cache_salt`)."""

    def __init__(self, enabled: bool, keys: KeyStore | None, shared_anonymous_cache: bool = False):
        self.enabled, self.keys, self.shared_anonymous_cache = enabled, keys, shared_anonymous_cache

    @classmethod
    def from_config(cls, auth) -> Authenticator:  # auth: deployments.config.AuthConfig
        keys = KeyStore(auth.keys_file, auth.keys_env) if auth.enabled else None
        return cls(auth.enabled, keys, auth.shared_anonymous_cache)

    def principal(self, authorization: str | None, how: str) -> Principal | None:
        """The principal of a request's authorization value (None with auth off); AuthError when it
        has no valid key. `how` says how to send one (HTTP header or gRPC metadata)."""
        if not self.enabled:
            return None
        token = bearer_token(authorization)
        if token is None:
            raise AuthError(f"missing API key: send {how} (`herd keys add --tenant NAME` makes a key)")
        assert self.keys is not None
        principal = self.keys.lookup(token)
        if principal is None:
            raise AuthError("invalid API key: unknown or revoked")
        return principal

    def cache_salt(self, principal: Principal | None, claimed: str, field: str, user: str = "") -> str:
        """The request's cache namespace. `claimed`: the tenant the request names in `field` (gRPC
        `tenant`, `x-herd-tenant`); `user`: OpenAI's `user`, a tenant only with auth off."""
        if principal is not None:
            if claimed and claimed != principal.tenant and not principal.admin:
                raise TenantForbidden(f"{field} names tenant {claimed!r} but the API key belongs to tenant "
                                      f"{principal.tenant!r}: leave {field} out (the key decides the tenant)")
            return "tenant:" + (claimed or principal.tenant)
        tenant = claimed or user
        if tenant:
            return "tenant:" + tenant
        return "" if self.shared_anonymous_cache else PRIVATE_SALT_PREFIX + uuid.uuid4().hex


def is_private_salt(salt: str) -> bool:
    """The salt of one anonymous request: its chunks are never looked up in nor written to Redis."""
    return salt.startswith(PRIVATE_SALT_PREFIX)
