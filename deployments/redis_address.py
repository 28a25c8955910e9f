"""Redis URLs: parsed and checked (redis:// or rediss:// for TLS; the password never in the URL)
and redacted (`redact`: the one function every log line, status and error message uses)."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlparse

# query parameters that redis-py's from_url (and other clients) read credentials from
SECRET_PARAMS = frozenset({"password", "pass", "passwd", "pwd", "username", "user", "auth", "token", "secret"})
CREDENTIALS_MESSAGE = ("put the Redis password in the environment variable named by redis.password_env, not in "
                       "the URL")


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
        if has_credentials(url):
            raise ValueError(CREDENTIALS_MESSAGE)
        db = int(u.path.lstrip("/") or 0)
        return cls(u.hostname or "127.0.0.1", u.port or 6379, db, u.scheme == "rediss")


def has_credentials(url: str) -> bool:
    """Whether `url` carries a user, a password or a credential query parameter (`?password=`);
    an unparsable URL is assumed to."""
    try:
        u = urlparse(url)
        return (u.username is not None or u.password is not None
                or any(k.lower() in SECRET_PARAMS for k, _ in parse_qsl(u.query, keep_blank_values=True)))
    except ValueError:
        return True


def redact(url: str) -> str:
    """`url` without credentials: no `user:password@`, and `REDACTED` for the value of every
    credential query parameter (for logs, errors and `herd status`)."""
    if not has_credentials(url):
        return url
    try:
        u = urlparse(url)
        netloc = u.netloc.rsplit("@", 1)[-1]
        params = parse_qsl(u.query, keep_blank_values=True)
    except ValueError:
        return "<unparsable Redis URL>"
    query = urlencode([(k, "REDACTED" if k.lower() in SECRET_PARAMS else v) for k, v in params], safe="")
    return u._replace(netloc=netloc, query=query).geturl()
