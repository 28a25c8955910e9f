"""The Redis connection on a real redis-server: bulk reads and writes, passwords, failures that
open the circuit breaker, and reconnection."""

import asyncio
import logging
import os
import time

import pytest
from pydantic import ValidationError

from deployments.config import HerdConfig
from deployments.engine.validation import describe_validation_error
from deployments.redis_address import RedisAddress, redact
from deployments.shared_cache.store import Breaker, RedisKVStore
from tests.cluster.conftest import RedisServer, free_port


@pytest.fixture
def server(tmp_path):
    s = RedisServer(tmp_path)
    yield s
    s.kill()


def test_values_round_trip_through_pipelined_reads(server):
    store = RedisKVStore(server.url)
    values = [os.urandom(n) for n in (0, 1, 70_000, 3 << 20)]
    for n, v in enumerate(values):
        assert store.put(f"k{n}", lambda v=v: v, len(v), lambda: None)
    store.flush()
    got = asyncio.run(store.get_many([f"k{n}" for n in range(len(values))] + ["missing"]))
    assert [bytes(g) for g in got[:-1]] == values and got[-1] is None
    assert server.client().ttl("k1") > 0  # written with a TTL
    assert store.stats.bytes_written == sum(map(len, values))


def test_password_from_the_environment(tmp_path):
    port_server = RedisServer(tmp_path)
    port_server.client().config_set("requirepass", "s3cret")
    try:
        assert RedisKVStore(port_server.url, "s3cret").get_many_blocking(["x"]) == [None]
        wrong = RedisKVStore(port_server.url, "nope")
        assert wrong.get_many_blocking(["x"]) is None and wrong.stats.errors["get"] == 1
    finally:
        port_server.proc.kill()


def test_a_dead_server_opens_the_breaker_and_a_restart_closes_it(server):
    store = RedisKVStore(server.url, timeout_s=0.5, breaker=Breaker(failures_to_open=2, cooldown_s=0.2))
    assert store.get_many_blocking(["a"]) == [None]
    server.kill()
    assert store.get_many_blocking(["a"]) is None and store.get_many_blocking(["a"]) is None
    assert store.breaker.is_open and not store.can_write()
    assert store.get_many_blocking(["a"]) is None  # skipped at once while open
    assert store.stats.errors["get"] == 2
    server.start()
    time.sleep(0.25)
    asyncio.run(store.probe())
    assert not store.breaker.is_open and store.get_many_blocking(["a"]) == [None]


def test_writes_beyond_the_byte_budget_are_dropped_and_counted(server):
    store = RedisKVStore(server.url, max_inflight_bytes=100)
    assert not store.put("big", lambda: b"x" * 200, 200, lambda: None)
    assert store.stats.writes_dropped == 1


def test_breaker_probes_once_per_cooldown():
    now = [0.0]
    b = Breaker(failures_to_open=1, cooldown_s=5, clock=lambda: now[0])
    assert b.failure() and not b.allow()
    now[0] = 5.0
    assert b.allow() and not b.allow()  # one probe
    assert b.success() and b.allow()


def test_urls_never_carry_credentials():
    assert redact("redis://user:pw@host:6380/0") == "redis://host:6380/0"
    assert redact("redis://host:6380/0?password=pw") == "redis://host:6380/0?password=REDACTED"
    assert redact("rediss://u:pw@h/1?Password=pw&socket_timeout=2&user=u") == \
        "rediss://h/1?Password=REDACTED&socket_timeout=2&user=REDACTED"
    assert redact("redis://host:6380/0?socket_timeout=2") == "redis://host:6380/0?socket_timeout=2"
    assert RedisAddress.parse("rediss://cache:6380/2") == RedisAddress("cache", 6380, 2, True)
    for url in ("redis://:pw@host", "redis://host/0?password=pw", "redis://host?auth=pw"):
        with pytest.raises(ValueError, match="password_env"):
            RedisAddress.parse(url)
    with pytest.raises(ValueError, match="redis://"):
        RedisAddress.parse("http://host")


@pytest.mark.parametrize("url", ["redis://:sekrit-pw@host:6379/0", "redis://host:6379/0?password=sekrit-pw",
                                 "redis://admin:sekrit-pw@host/0?password=sekrit-pw"])
def test_a_config_error_never_repeats_the_password(url):
    """What `herd up` prints and Serve logs for a refused config names the field, not the secret."""
    with pytest.raises(ValidationError) as info:
        HerdConfig.model_validate({"model": "m", "redis": {"url": url}})
    assert "sekrit" not in str(info.value) and "sekrit" not in describe_validation_error(info.value)
    assert "redis.url" in describe_validation_error(info.value)
    assert "password_env" in describe_validation_error(info.value)


def test_store_logs_never_carry_the_password(caplog):
    store = RedisKVStore(f"redis://127.0.0.1:{free_port()}/0", "sekrit-pw", timeout_s=0.2)
    with caplog.at_level(logging.DEBUG):
        assert store.get_many_blocking(["k"]) is None and store.get_many_blocking(["k"]) is None
    store.close()
    assert "unavailable" in caplog.text and "sekrit" not in caplog.text


def test_the_writer_survives_a_write_that_raises(server):
    """A write whose encoding raises (a bug, not a Redis error) is logged and counted; the writer
    thread goes on with the next write instead of dying silently."""
    store = RedisKVStore(server.url)

    def broken() -> bytes:
        raise ValueError("encoder bug")

    assert store.put("bad", broken, 10, lambda: None)
    assert store.put("good", lambda: b"value", 5, lambda: None)
    store.flush(timeout_s=5)
    assert server.client().get("good") == b"value"
    assert store.stats.errors == {"write_internal": 1} and store._inflight == 0
    assert store._writer.is_alive()


@pytest.mark.parametrize("url", [
    "redis://host:6379/0?password=hunter2", "redis://user:hunter2@host:6379", "rediss://:hunter2@host/1?x=1",
    "redis://host/0?username=u&password=hunter2",
])
def test_credentials_in_a_url_are_refused_and_never_echoed(url):
    """`?password=` as well as user:pass@: refused (use redis.password_env), and neither the error
    (as the CLI shows it) nor redact() nor the store's logs carry it."""
    from pydantic import ValidationError

    from deployments.config import HerdConfig
    from deployments.engine.validation import describe_validation_error

    assert "hunter2" not in redact(url)
    with pytest.raises(ValueError, match="password_env") as info:
        RedisAddress.parse(url)
    assert "hunter2" not in str(info.value)
    with pytest.raises(ValidationError) as config_error:
        HerdConfig.model_validate({"model": "m", "redis": {"url": url}})
    assert "password_env" in describe_validation_error(config_error.value)
    assert "hunter2" not in describe_validation_error(config_error.value) and "hunter2" not in str(config_error.value)
