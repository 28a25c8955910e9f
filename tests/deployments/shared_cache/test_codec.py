"""Stored KV values: a round trip is exact; anything wrong with a value is a named rejection; keys and
values cannot be computed or forged without the secret."""

import hashlib
import hmac

import pytest
import torch

from deployments.engine.kv_manager import KVGroup
from deployments.engine.kv_transfer import KVChunk
from deployments.shared_cache.codec import TAG_BYTES, CacheSecret, CorruptChunk, KVLayout, Namespace, decode, encode

GROUPS = [KVGroup("full", (3,), None, 8), KVGroup("chunked", (0, 1, 2), 32, 8)]
SECRET = b"s" * 32
DIGEST = b"\x01" * 16


def namespace(model: str = "a" * 32, dtype=torch.float32, chunk_tokens: int = 16, secret: bytes = SECRET) -> Namespace:
    return Namespace(model, KVLayout.of(GROUPS, dtype, 4, chunk_tokens, 2, 8), CacheSecret(secret))


def chunk(ns: Namespace, groups=("full", "chunked")) -> KVChunk:
    g = torch.Generator().manual_seed(0)
    kv = {name: torch.randn(ns.layout.shape(name), generator=g).to(ns.layout.torch_dtype) for name in groups}
    return KVChunk(2, DIGEST, kv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("groups", [("full",), ("full", "chunked")])
def test_round_trip_is_exact(dtype, groups):
    ns = namespace(dtype=dtype)
    original = chunk(ns, groups)
    back = decode(ns, encode(ns, original), original.digest, original.index)
    assert set(back.kv) == set(groups)
    for name in groups:
        assert back.kv[name].dtype == dtype and torch.equal(back.kv[name], original.kv[name])


def test_keys_separate_models_layouts_prefixes_and_secrets():
    ns = namespace()
    keys = {ns.key(DIGEST), ns.key(b"\x02" * 16), namespace(model="b" * 32).key(DIGEST),
            namespace(chunk_tokens=32).key(DIGEST), namespace(dtype=torch.bfloat16).key(DIGEST),
            namespace(secret=b"t" * 32).key(DIGEST)}
    assert len(keys) == 6


def test_a_value_does_not_name_its_prefix():
    ns = namespace()
    value = bytes(encode(ns, chunk(ns)))
    assert DIGEST.hex().encode() not in value and DIGEST not in value


def test_a_key_cannot_be_computed_from_public_facts():
    """Without the secret, the digest and the model's facts do not give the key: neither the old
    unkeyed form nor any plain hash of them appears in it."""
    ns = namespace()
    key = ns.key(DIGEST)
    assert DIGEST.hex() not in key
    facts = f"2|{ns.model}|{ns.layout.id}|".encode() + DIGEST
    for plain in (hashlib.sha256(facts).hexdigest(), hashlib.blake2b(facts).hexdigest(),
                  hmac.new(b"", facts, "sha256").hexdigest()):
        assert plain not in key


def rejects(ns, value, reason, digest=DIGEST, index=2):
    with pytest.raises(CorruptChunk) as info:
        decode(ns, value, digest, index)
    assert info.value.reason == reason


def test_bad_values_are_rejected_with_a_reason():
    ns = namespace()
    good = encode(ns, chunk(ns))
    rejects(ns, good[:-1], "mac")
    rejects(ns, good[:30], "truncated")
    rejects(ns, b"not a herd value at all", "header")
    rejects(namespace(model="b" * 32), good, "mac")  # another model's key, so another MAC
    rejects(namespace(chunk_tokens=32), good, "mac")
    rejects(ns, good, "mac", digest=b"\x02" * 16)  # stored under another chunk's key


def test_a_value_written_without_the_secret_is_rejected():
    """The attacker knows the format and every public fact; without the secret the tag is wrong."""
    ns = namespace()
    c = chunk(ns)
    for forger in (namespace(secret=b"x" * 32), namespace(secret=b"s" * 31 + b"t")):
        rejects(ns, encode(forger, c), "mac")
    good = encode(ns, c)
    rejects(ns, good[:-TAG_BYTES] + bytes(TAG_BYTES), "mac")  # right shape, zero tag
    rejects(ns, good[:-TAG_BYTES] + hashlib.sha256(bytes(good[:-TAG_BYTES])).digest(), "mac")  # unkeyed hash


@pytest.mark.parametrize("where", ["magic", "header length", "header", "payload", "tag"])
def test_every_flipped_bit_is_rejected(where):
    ns = namespace()
    good = encode(ns, chunk(ns))
    hlen = int.from_bytes(good[8:12], "little")
    at = {"magic": 8 - 1, "header length": 9, "header": 12 + hlen // 2, "payload": len(good) - TAG_BYTES - 7,
          "tag": len(good) - 3}[where]
    for bit in (0, 3, 7):
        bad = bytearray(good)
        bad[at] ^= 1 << bit
        with pytest.raises(CorruptChunk) as info:
            decode(ns, bad, DIGEST, 2)
        assert info.value.reason in ("mac", "header")


def test_a_short_secret_is_refused_and_never_shown():
    with pytest.raises(ValueError, match="at least 16 bytes"):
        CacheSecret(b"short")
    ns = namespace(secret=b"do-not-print-this-secret-0123456789")
    assert "do-not-print" not in repr(ns) and "do-not-print" not in repr(ns.secret)
