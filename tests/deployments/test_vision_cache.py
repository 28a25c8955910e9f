"""VisionEncoder.embed: its cache of embeddings by image digest (LRU bounded in bytes by
`vision.cache_bytes`, 0 = off; a hit skips decoding and the tower and counts in
herd_vision_cache_hits), and decoding off the event loop. The tower and the image processor are
stubbed: only the deployment's own logic runs."""

import asyncio
import threading
from types import SimpleNamespace

import pytest
import torch

from deployments.lru import LRUCache
from deployments.vision import VisionEncoder, embedding_bytes

ROWS = {"a": 4, "b": 4, "c": 4, "big": 64}  # embeddings rows per image; 16 fp32 columns: 256 B per 4 rows


class Count:
    def __init__(self):
        self.value = 0

    def inc(self):
        self.value += 1


def encoder(cache_bytes: int, monkeypatch, decode=lambda data, limits: data):
    monkeypatch.setattr("deployments.vision.decode_image", decode)
    enc = object.__new__(VisionEncoder.func_or_class)
    enc.limits = None
    enc.cache = LRUCache(cache_bytes, weigh=embedding_bytes)
    enc.metrics = SimpleNamespace(cache_hits=Count())
    enc.processor = SimpleNamespace(preprocess=lambda data: SimpleNamespace(aspect_ratio=(1, 1), pixel_values=data))
    enc.encoded = []

    async def encode_batch(pixels):
        enc.encoded.append(pixels)
        return torch.full((ROWS[pixels], 16), float(len(enc.encoded)))

    enc.encode_batch = encode_batch
    return enc


def embed(enc, digest):
    return asyncio.run(enc.embed(digest, digest))


@pytest.mark.parametrize("cache_bytes", [600, 0])
def test_hits_skip_the_tower_and_count_least_recent_goes_first(cache_bytes, monkeypatch):
    enc = encoder(cache_bytes, monkeypatch)  # 600 bytes: two 256-byte entries
    for digest in ["a", "b", "a", "c", "b", "a"]:
        ratio, embeds = embed(enc, digest)
        assert ratio == (1, 1) and embeds.shape == (4, 16)
    if cache_bytes:  # a hit ("a" refreshed), then "c" evicts "b", then "b" evicts "a"
        assert enc.encoded == ["a", "b", "c", "b", "a"] and enc.metrics.cache_hits.value == 1
    else:
        assert enc.encoded == ["a", "b", "a", "c", "b", "a"] and enc.metrics.cache_hits.value == 0


def test_the_cache_is_bounded_in_bytes_not_entries(monkeypatch):
    """One large embedding evicts as many small ones as its bytes need; one larger than the whole
    budget is not kept (it would evict everything and stay alone)."""
    enc = encoder(1100, monkeypatch)
    for digest in ["a", "b", "c"]:
        embed(enc, digest)
    assert enc.cache.weight == 3 * 256 and len(enc.cache) == 3
    embed(enc, "big")  # 4096 bytes > 1100: served, not cached, the small ones stay
    assert len(enc.cache) == 3 and "big" not in enc.cache
    enc.cache.maxsize = 4500
    embed(enc, "big")  # now it fits only after evicting the least recent small ones
    assert "big" in enc.cache and enc.cache.weight <= 4500 and list(enc.cache) == ["c", "big"]


def test_images_are_decoded_off_the_event_loop(monkeypatch):
    """While one image decodes, the replica's event loop runs other work: here the decode waits
    for a coroutine on that loop (decoding on the loop, as before, deadlocked it until timeout)."""
    loop_ran = threading.Event()

    def slow_decode(data, limits):
        assert loop_ran.wait(5), "the event loop was blocked while the image decoded"
        return data

    enc = encoder(0, monkeypatch, decode=slow_decode)

    async def main():
        async def tick():
            loop_ran.set()

        ticker = asyncio.get_running_loop().create_task(tick())
        result = await enc.embed("a", "a")
        await ticker
        return result

    assert asyncio.run(main())[1].shape == (4, 16)


def test_lru_by_weight_replaces_and_clears():
    cache: LRUCache[str, bytes] = LRUCache(10, weigh=len)
    cache.put("x", b"12345")
    cache.put("x", b"123")  # replacing frees the old weight
    cache.put("y", b"1234567")
    assert cache.weight == 10 and list(cache) == ["x", "y"]
    cache.put("z", b"12")
    assert list(cache) == ["y", "z"] and cache.weight == 9
    cache.clear()
    assert cache.weight == 0 and len(cache) == 0
