"""Keys and values of the shared KV tier.

Key: `herd:kv:<format>:<model fingerprint>:<KV layout id>:<chunk digest>`. The chunk digest chains
the tenant salt, every token id and image hash up to the chunk's end (block_pool.block_hash), so a
key names exactly one prefix of one tenant on one model with one KV layout.

Value: `MAGIC | u32 header length | header (JSON) | u32 crc32(payload) | payload`. The header repeats
the key's facts (model, layout, digest, chunk index) and the shape and dtype of each KV group's
tensor; the payload is those tensors back to back. `decode` checks all of it against what the
reader expects: a value that is truncated, corrupt, for another model or layout, or stored under
the wrong key raises `CorruptChunk` and is treated as a miss; it never reaches the KV cache.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import struct
import warnings
import zlib
from dataclasses import asdict, dataclass

import torch

from deployments.engine.kv_manager import KVGroup
from deployments.engine.kv_transfer import KVChunk

FORMAT_VERSION = 1
MAGIC = b"HERDKV\x01\n"
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


@dataclass(frozen=True)
class Namespace:
    """The reader's identity: which model and layout a value must belong to."""

    model: str  # checkpoint fingerprint (model.checkpoint.fingerprint)
    layout: KVLayout

    def key(self, digest: bytes) -> str:
        return f"herd:kv:{FORMAT_VERSION}:{self.model[:16]}:{self.layout.id}:{digest.hex()}"


def encode(ns: Namespace, chunk: KVChunk) -> bytearray:
    groups = {name: list(t.shape) for name, t in chunk.kv.items()}
    header = json.dumps({"model": ns.model, "layout": ns.layout.id, "digest": chunk.digest.hex(),
                         "index": chunk.index, "dtype": ns.layout.dtype, "groups": groups}).encode()
    size = chunk.nbytes
    out = bytearray(len(MAGIC) + 4 + len(header) + 4 + size)
    offset = len(MAGIC) + 4 + len(header)
    out[: offset] = MAGIC + _U32.pack(len(header)) + header
    payload = memoryview(out)[offset + 4:]
    pos = 0
    for t in chunk.kv.values():
        raw = t.contiguous().view(torch.uint8).reshape(-1).numpy()
        payload[pos : pos + raw.size] = raw.data
        pos += raw.size
    out[offset : offset + 4] = _U32.pack(zlib.crc32(payload))
    return out


def decode(ns: Namespace, value: bytes | bytearray, digest: bytes, index: int) -> KVChunk:
    """The chunk stored in `value` under `ns.key(digest)`, or CorruptChunk."""
    view = memoryview(value)
    if len(view) < len(MAGIC) + 8 or bytes(view[: len(MAGIC)]) != MAGIC:
        raise CorruptChunk("header", "not a Herd KV value (bad magic)")
    (hlen,) = _U32.unpack_from(view, len(MAGIC))
    start = len(MAGIC) + 4
    if start + hlen + 4 > len(view):
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
    if header.get("digest") != digest.hex() or header.get("index") != index:
        raise CorruptChunk("header", "the value belongs to another chunk")
    known = {name for name, _, _ in ns.layout.groups}
    if not groups or not set(groups) <= known or any(groups[g] != ns.layout.shape(g) for g in groups):
        raise CorruptChunk("layout", f"unexpected tensor shapes {groups}")
    (crc,) = _U32.unpack_from(view, start + hlen)
    payload = view[start + hlen + 4 :]
    itemsize = ns.layout.torch_dtype.itemsize
    sizes = {g: math.prod(shape) * itemsize for g, shape in groups.items()}
    if len(payload) != sum(sizes.values()):
        raise CorruptChunk("truncated", f"payload of {len(payload)} bytes, expected {sum(sizes.values())}")
    if zlib.crc32(payload) != crc:
        raise CorruptChunk("checksum", "payload checksum mismatch")
    kv, pos = {}, 0
    with warnings.catch_warnings():  # a view of the (read-only) reply: only ever copied into the cache
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        for g, shape in groups.items():
            kv[g] = torch.frombuffer(payload[pos : pos + sizes[g]], dtype=ns.layout.torch_dtype).view(shape)
            pos += sizes[g]
    return KVChunk(index, digest, kv)

