"""LRUCache: eviction order, what refreshes recency (get, put) and what does not (peek, in), maxsize 0."""

import pytest

from deployments.lru import LRUCache


def test_put_evicts_the_least_recently_used_beyond_maxsize():
    c: LRUCache[str, int] = LRUCache(3)
    for i, k in enumerate("abcd"):
        c.put(k, i)
    assert list(c) == ["b", "c", "d"] and len(c) == 3 and "a" not in c


def test_get_and_put_refresh_recency_peek_and_in_do_not():
    c: LRUCache[str, int] = LRUCache(3)
    for i, k in enumerate("abc"):
        c.put(k, i)
    assert c.get("a") == 0  # a is now the most recent: b goes first
    assert c.peek("b") == 1 and "b" in c  # neither refreshes b
    c.put("d", 3)
    assert list(c) == ["c", "a", "d"]
    c.put("c", 20)  # replacing a value refreshes it too
    c.put("e", 4)
    assert list(c) == ["d", "c", "e"] and c.peek("c") == 20


def test_absent_keys_give_the_default():
    c: LRUCache[str, int] = LRUCache(2)
    assert c.get("x") is None and c.get("x", -1) == -1
    assert c.peek("x") is None and c.peek("x", -1) == -1
    assert len(c) == 0


def test_maxsize_zero_disables_and_negative_is_refused():
    c: LRUCache[str, int] = LRUCache(0)
    c.put("a", 1)
    assert len(c) == 0 and c.get("a") is None
    with pytest.raises(ValueError):
        LRUCache(-1)


def test_clear():
    c: LRUCache[int, None] = LRUCache(4)
    for i in range(3):
        c.put(i, None)
    c.clear()
    assert len(c) == 0 and 0 not in c
