"""VisionEncoder.embed's cache of embeddings by image digest (LRU of `vision.cache_size`, 0 = off):
a hit skips decoding and the tower and counts in herd_vision_cache_hits. The tower and the image
processor are stubbed: only the caching logic runs."""

import asyncio
from types import SimpleNamespace

import pytest

from deployments.lru import LRUCache
from deployments.vision import VisionEncoder


class Count:
    def __init__(self):
        self.value = 0

    def inc(self):
        self.value += 1


def encoder(cache_size: int, monkeypatch):
    monkeypatch.setattr("deployments.vision.decode_image", lambda data, limits: data)
    enc = object.__new__(VisionEncoder.func_or_class)
    enc.limits = None
    enc.cache = LRUCache(cache_size)
    enc.metrics = SimpleNamespace(cache_hits=Count())
    enc.processor = SimpleNamespace(preprocess=lambda data: SimpleNamespace(aspect_ratio=(1, 1), pixel_values=data))
    enc.encoded = []

    async def encode_batch(pixels):
        enc.encoded.append(pixels)
        return f"embeds of {pixels}"

    enc.encode_batch = encode_batch
    return enc


def embed(enc, digest):
    return asyncio.run(enc.embed(digest, digest))


@pytest.mark.parametrize("cache_size", [2, 0])
def test_hits_skip_the_tower_and_count_least_recent_goes_first(cache_size, monkeypatch):
    enc = encoder(cache_size, monkeypatch)
    for digest in ["a", "b", "a", "c", "b", "a"]:
        assert embed(enc, digest) == ((1, 1), f"embeds of {digest}")
    if cache_size:  # a hit ("a" refreshed), then "c" evicts "b", then "b" evicts "a"
        assert enc.encoded == ["a", "b", "c", "b", "a"] and enc.metrics.cache_hits.value == 1
    else:
        assert enc.encoded == ["a", "b", "a", "c", "b", "a"] and enc.metrics.cache_hits.value == 0
