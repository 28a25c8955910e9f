"""Stored KV values: a round trip is exact; anything wrong with a value is a named rejection."""

import pytest
import torch

from deployments.engine.kv_manager import KVGroup
from deployments.engine.kv_transfer import KVChunk
from deployments.shared_cache.codec import CorruptChunk, KVLayout, Namespace, decode, encode

GROUPS = [KVGroup("full", (3,), None, 8), KVGroup("chunked", (0, 1, 2), 32, 8)]


def namespace(model: str = "a" * 32, dtype=torch.float32, chunk_tokens: int = 16) -> Namespace:
    return Namespace(model, KVLayout.of(GROUPS, dtype, 4, chunk_tokens, 2, 8))


def chunk(ns: Namespace, groups=("full", "chunked")) -> KVChunk:
    g = torch.Generator().manual_seed(0)
    kv = {name: torch.randn(ns.layout.shape(name), generator=g).to(ns.layout.torch_dtype) for name in groups}
    return KVChunk(2, b"\x01" * 16, kv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("groups", [("full",), ("full", "chunked")])
def test_round_trip_is_exact(dtype, groups):
    ns = namespace(dtype=dtype)
    original = chunk(ns, groups)
    back = decode(ns, encode(ns, original), original.digest, original.index)
    assert set(back.kv) == set(groups)
    for name in groups:
        assert back.kv[name].dtype == dtype and torch.equal(back.kv[name], original.kv[name])


def test_keys_separate_models_layouts_and_prefixes():
    ns = namespace()
    keys = {ns.key(b"\x01" * 16), ns.key(b"\x02" * 16), namespace(model="b" * 32).key(b"\x01" * 16),
            namespace(chunk_tokens=32).key(b"\x01" * 16), namespace(dtype=torch.bfloat16).key(b"\x01" * 16)}
    assert len(keys) == 5


def rejects(ns, value, reason, digest=b"\x01" * 16, index=2):
    with pytest.raises(CorruptChunk) as info:
        decode(ns, value, digest, index)
    assert info.value.reason == reason


def test_bad_values_are_rejected_with_a_reason():
    ns = namespace()
    good = encode(ns, chunk(ns))
    rejects(ns, good[:-1], "truncated")
    rejects(ns, good[:30], "truncated")
    flipped = bytearray(good)
    flipped[-5] ^= 0xFF
    rejects(ns, flipped, "checksum")
    rejects(ns, b"not a herd value at all", "header")
    rejects(namespace(model="b" * 32), good, "foreign_model")
    rejects(namespace(chunk_tokens=32), good, "layout")
    rejects(ns, good, "header", digest=b"\x02" * 16)  # stored under another chunk's key
    rejects(ns, good, "header", index=3)
