"""API keys on this machine: herd up's key store and admin key, `herd keys`, and the key clients send.

`herd up` (auth on, the default) keeps its key store in `$HERD_HOME/keys.json` (hashes only) and
makes an admin key on first start: printed once, kept in `$HERD_HOME/admin-key` (mode 0600) so that
`herd chat` / `herd generate` on this machine find it by themselves. Elsewhere a client passes
`--api-key` or sets `HERD_API_KEY`. The key store's format and the server side: deployments/auth.py.
"""

from __future__ import annotations

import os
from pathlib import Path

from cluster.home import herd_home
from deployments.auth import ADMIN_TENANT, KeyStore, KeyStoreError, add_key, read_key_file, revoke_key

API_KEY_ENV = "HERD_API_KEY"


def default_keys_file() -> Path:
    """herd up's key store."""
    return herd_home() / "keys.json"


def admin_key_file() -> Path:
    return herd_home() / "admin-key"


def client_api_key(explicit: str | None = None) -> str | None:
    """The key a client sends: --api-key, else $HERD_API_KEY, else this machine's admin key (herd up's)."""
    if explicit:
        return explicit
    if os.environ.get(API_KEY_ENV):
        return os.environ[API_KEY_ENV].strip()
    try:
        return admin_key_file().read_text().strip() or None
    except OSError:
        return None


def _write_secret(path: Path, text: str) -> None:
    """Write `text` to a new file only its owner can read (0600 from the start, never wider)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")


def admin_key_works(keys_file: Path) -> bool:
    """The admin key file holds a key that `keys_file` accepts."""
    try:
        key = admin_key_file().read_text().strip()
        return KeyStore(str(keys_file)).lookup(key) is not None
    except (OSError, KeyStoreError):
        return False


def ensure_admin_key(keys_file: Path) -> tuple[str, str] | None:
    """Make an admin key in `keys_file` unless the admin key file already holds one it accepts:
    (the new key, its id), to be shown once; None when there was one already."""
    if admin_key_works(keys_file):
        return None
    key, record = add_key(keys_file, ADMIN_TENANT, admin=True)
    _write_secret(admin_key_file(), key)
    return key, record.id


def forget_admin_key(keys_file: Path, key_id: str) -> None:
    """Undo `ensure_admin_key` (herd up failed after making it: nothing it made is left)."""
    try:
        revoke_key(keys_file, key_id)
    except KeyStoreError:
        pass
    admin_key_file().unlink(missing_ok=True)


def revoke(keys_file: Path, key_id: str) -> list[str]:
    """Revoke `key_id` in `keys_file`; lines saying what was done."""
    record = revoke_key(keys_file, key_id)
    done = [f"revoked key {record.id} of tenant {record.tenant} (servers reading {keys_file} refuse it now)"]
    if record.admin and not admin_key_works(keys_file) and admin_key_file().exists():
        admin_key_file().unlink()
        done.append(f"removed {admin_key_file()}; the next `herd up` makes a new admin key")
    return done


def list_keys(keys_file: Path) -> list[dict]:
    return [{"id": r.id, "tenant": r.tenant, "admin": r.admin, "created": r.created} for r in read_key_file(keys_file)]
