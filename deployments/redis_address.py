"""Redis URLs: parsed and checked (redis:// or rediss:// for TLS; the password never in the URL,
neither as `user:pass@` nor as a `?password=` query parameter) and redacted for logs, error
messages and `herd status`."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl, urlparse

# Query parameters redis-py's from_url reads as credentials (a URL may carry them instead of user:pass@).
CREDENTIAL_PARAMS = frozenset({"password", "username", "user", "pass", "passwd", "auth", "token"})


@dataclass(frozen=True)
class RedisAddress:
    host: str
    port: int
    db: int
    tls: bool

    @classmethod
    def parse(cls, url: str) -> RedisAddress:
        if has_credentials(url):
            raise ValueError("put the Redis password in the environment variable named by redis.password_env, "
                             "not in the URL")
        u = urlparse(url)
        if u.scheme not in ("redis", "rediss"):
            raise ValueError(f"Redis URL {redact(url)!r} must start with redis:// or rediss://")
        if u.query:
            raise ValueError(f"Redis URL {redact(url)!r}: query parameters are not supported; set the redis.* "
                             "config fields instead")
        db = int(u.path.lstrip("/") or 0)
        return cls(u.hostname or "127.0.0.1", u.port or 6379, db, u.scheme == "rediss")


def has_credentials(url: str) -> bool:
    """Does `url` carry a user name or password (in its netloc or its query)?"""
    try:
        u = urlparse(url)
        if u.username is not None or u.password is not None:
            return True
        return any(k.lower() in CREDENTIAL_PARAMS for k, _ in parse_qsl(u.query, keep_blank_values=True))
    except ValueError:  # unparsable: assume the worst
        return True


def redact(url: str) -> str:
    """`url` without credentials (user:pass@ and the query, which may hold `?password=`): for logs,
    error messages and `herd status`."""
    try:
        u = urlparse(url)
        if u.username is None and u.password is None and not u.query:
            return url
        host = (u.hostname or "") + (f":{u.port}" if u.port else "")
    except ValueError:
        return "<unparsable Redis URL>"
    return u._replace(netloc=host, query="").geturl()
