"""Keys and values of the shared KV tier, both keyed by a secret only the replicas hold.

Key: `herd:kv:<format>:<model fingerprint[:16]>:<KV layout id>:<name>`, where `name` is
HMAC-SHA256(key secret, format | model fingerprint | KV layout id | chunk digest). The chunk digest
chains the tenant salt, every token id and image hash up to the chunk's end (block_pool.block_hash),
so a key names exactly one prefix of one tenant on one model with one KV layout, and without the
secret nobody can compute which key holds which prefix.

Value: `MAGIC | u32 header length | header (JSON) | payload | tag`. The header repeats the key's
facts (model, layout, chunk index; not the chunk digest, which would let a reader of Redis test
guesses of a prompt) and the shape and dtype of each KV group's tensor; the payload is those tensors
back to back; the tag is HMAC-SHA256(MAC secret, key | everything before the tag), so a value cannot
be forged, altered or moved to another key (another chunk) without the secret. `decode`
checks the tag first, then everything else against what the reader expects: a value that is forged,
truncated, corrupt, written with another secret, for another model or layout, or stored under the
wrong key raises `CorruptChunk` and is treated as a miss; it never reaches the KV cache.

The two HMAC keys are derived from the one configured secret (`CacheSecret`); a new secret makes
new keys (a cold cache) and the old entries expire by their TTL.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import math
import struct
import warnings
from dataclasses import asdict, dataclass, field

import torch

from deployments.engine.kv_manager import KVGroup
from deployments.engine.kv_transfer import KVChunk

FORMAT_VERSION = 2
MAGIC = b"HERDKV\x02\n"
TAG_BYTES = 32  # HMAC-SHA256
MIN_SECRET_BYTES = 16
_U32 = struct.Struct("<I")


class CorruptChunk(ValueError):
    """A stored value that must not be used; `reason` labels the integrity-failure metric."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass(frozen=True)
class KVLayout:
    """Everything that makes KV bytes usable by a reader besides the model weights."""

    dtype: str
    block_size: int
    chunk_tokens: int
    num_kv_heads: int
    head_dim: int
    groups: tuple[tuple[str, tuple[int, ...], int | None], ...]  # name, layers, attention window

    @classmethod
    def of(cls, groups: list[KVGroup], dtype: torch.dtype, block_size: int, chunk_tokens: int,
           num_kv_heads: int, head_dim: int) -> KVLayout:
        return cls(str(dtype).removeprefix("torch."), block_size, chunk_tokens, num_kv_heads, head_dim,
                   tuple((g.name, tuple(g.layers), g.chunk) for g in groups))

    @functools.cached_property
    def id(self) -> str:
        return hashlib.blake2b(json.dumps(asdict(self)).encode(), digest_size=8).hexdigest()

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def shape(self, group: str) -> tuple[int, ...]:
        layers = next(layers for name, layers, _ in self.groups if name == group)
        return (len(layers), 2, self.chunk_tokens, self.num_kv_heads, self.head_dim)

    def bytes_per_token(self, group: str) -> int:
        return math.prod(self.shape(group)) * self.torch_dtype.itemsize // self.chunk_tokens


class CacheSecret:
    """The shared secret of the KV tier and the two HMAC keys derived from it (one names keys, one
    authenticates values). Its repr never shows the secret."""

    def __init__(self, secret: bytes):
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"the shared-cache secret must be at least {MIN_SECRET_BYTES} bytes, got {len(secret)}")
        self.key_key = hmac.digest(secret, b"herd-kv-key-names", "sha256")
        self.mac_key = hmac.digest(secret, b"herd-kv-value-macs", "sha256")

    def __repr__(self) -> str:
        return "CacheSecret(<hidden>)"


@dataclass(frozen=True)
class Namespace:
    """The reader's identity: which model and layout a value must belong to, and the secret that
    names and authenticates keys and values."""

    model: str  # checkpoint fingerprint (model.checkpoint.fingerprint)
    layout: KVLayout
    secret: CacheSecret = field(repr=False)

    def key(self, digest: bytes) -> str:
        facts = f"{FORMAT_VERSION}|{self.model}|{self.layout.id}|".encode()
        name = hmac.digest(self.secret.key_key, facts + digest, "sha256").hex()
        return f"herd:kv:{FORMAT_VERSION}:{self.model[:16]}:{self.layout.id}:{name}"

    def tag(self, key: str, body: memoryview) -> bytes:
        """The MAC of a value stored under `key` (`body`: the value up to its tag)."""
        mac = hmac.new(self.secret.mac_key, key.encode(), "sha256")
        mac.update(body)
        return mac.digest()


def encode(ns: Namespace, chunk: KVChunk) -> bytearray:
    groups = {name: list(t.shape) for name, t in chunk.kv.items()}
    header = json.dumps({"model": ns.model, "layout": ns.layout.id, "index": chunk.index,
                         "dtype": ns.layout.dtype, "groups": groups}).encode()
    size = chunk.nbytes
    out = bytearray(len(MAGIC) + 4 + len(header) + size + TAG_BYTES)
    offset = len(MAGIC) + 4 + len(header)
    out[: offset] = MAGIC + _U32.pack(len(header)) + header
    view = memoryview(out)
    pos = offset
    for t in chunk.kv.values():
        raw = t.contiguous().view(torch.uint8).reshape(-1).numpy()
        view[pos : pos + raw.size] = raw.data
        pos += raw.size
    view[pos:] = ns.tag(ns.key(chunk.digest), view[:pos])
    return out


def decode(ns: Namespace, value: bytes | bytearray, digest: bytes, index: int) -> KVChunk:
    """The chunk stored in `value` under `ns.key(digest)`, or CorruptChunk."""
    view = memoryview(value)
    if bytes(view[: len(MAGIC)]) != MAGIC:
        raise CorruptChunk("header", "not a Herd KV value of this format (bad magic)")
    if len(view) < len(MAGIC) + 4 + TAG_BYTES:
        raise CorruptChunk("truncated", f"a value of {len(view)} bytes")
    body, tag = view[:-TAG_BYTES], view[-TAG_BYTES:]
    if not hmac.compare_digest(ns.tag(ns.key(digest), body), tag):
        raise CorruptChunk("mac", "the value's MAC does not match (forged, altered, truncated, or written with "
                           "another secret)")
    (hlen,) = _U32.unpack_from(view, len(MAGIC))
    start = len(MAGIC) + 4
    if start + hlen > len(body):
        raise CorruptChunk("truncated", "the value ends inside its header")
    try:
        header = json.loads(bytes(view[start : start + hlen]))
        groups = {name: tuple(shape) for name, shape in header["groups"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CorruptChunk("header", f"unreadable header: {e}") from e
    if header.get("model") != ns.model:
        raise CorruptChunk("foreign_model", "the value was written by another model")
    if header.get("layout") != ns.layout.id or header.get("dtype") != ns.layout.dtype:
        raise CorruptChunk("layout", "the value has another KV layout")
    if header.get("index") != index:
        raise CorruptChunk("header", "the value belongs to another chunk")
    known = {name for name, _, _ in ns.layout.groups}
    if not groups or not set(groups) <= known or any(groups[g] != ns.layout.shape(g) for g in groups):
        raise CorruptChunk("layout", f"unexpected tensor shapes {groups}")
    payload = body[start + hlen :]
    itemsize = ns.layout.torch_dtype.itemsize
    sizes = {g: math.prod(shape) * itemsize for g, shape in groups.items()}
    if len(payload) != sum(sizes.values()):
        raise CorruptChunk("truncated", f"payload of {len(payload)} bytes, expected {sum(sizes.values())}")
    kv, pos = {}, 0
    with warnings.catch_warnings():  # a view of the (read-only) reply: only ever copied into the cache
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        for g, shape in groups.items():
            kv[g] = torch.frombuffer(payload[pos : pos + sizes[g]], dtype=ns.layout.torch_dtype).view(shape)
            pos += sizes[g]
    return KVChunk(index, digest, kv)

