"""Redis URLs: parsed and checked (redis:// or rediss:// for TLS; the password never in the URL)
and redacted for logs and `herd status`."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlparse


@dataclass(frozen=True)
class RedisAddress:
    host: str
    port: int
    db: int
    tls: bool

    @classmethod
    def parse(cls, url: str) -> RedisAddress:
        u = urlparse(url)
        if u.scheme not in ("redis", "rediss"):
            raise ValueError(f"Redis URL {redact(url)!r} must start with redis:// or rediss://")
        if u.password or u.username:
            raise ValueError("put the Redis password in the environment variable named by redis.password_env, "
                             "not in the URL")
        db = int(u.path.lstrip("/") or 0)
        return cls(u.hostname or "127.0.0.1", u.port or 6379, db, u.scheme == "rediss")


def redact(url: str) -> str:
    """`url` without credentials (for logs and `herd status`)."""
    u = urlparse(url)
    if u.password is None and u.username is None:
        return url
    host = u.hostname + (f":{u.port}" if u.port else "")
    return u._replace(netloc=host).geturl()
