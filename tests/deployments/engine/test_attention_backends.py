"""The attention-backend seam: backends are chosen by name from the registry, a bad name fails at
config validation, and the reference backend attends causally within each query's chunk over the
paged cache exactly as dense masked attention does."""

import pytest
import torch
from pydantic import ValidationError

from deployments.engine.attention import ATTENTION_BACKENDS, attention_backend, resolve_attention_backend
from deployments.engine.attention.flex import FlexBackend
from deployments.engine.attention.reference import ReferenceBackend
from deployments.engine.config import EngineConfig
from deployments.engine.kv_manager import KVGroup, KVManager
from deployments.engine.scheduler import ScheduledChunk
from deployments.engine.sequence import Sequence
from model.errors import ConfigError
from model.text import masked_attention


def test_registry_and_config_know_the_same_backends():
    assert attention_backend("reference") is ReferenceBackend
    assert attention_backend("flex") is FlexBackend
    for name in ["reference", "flex", "auto"]:
        assert EngineConfig(attention_backend=name).attention_backend == name
    assert EngineConfig().attention_backend == "reference"
    with pytest.raises(ValidationError, match="unknown attention backend 'flesh'"):
        EngineConfig(attention_backend="flesh")
    with pytest.raises(ConfigError, match="choose one of"):
        attention_backend("flesh")
    assert set(ATTENTION_BACKENDS) >= {"reference", "flex"}


def test_auto_is_flex_on_cuda_and_reference_elsewhere():
    assert resolve_attention_backend("auto", torch.device("cuda")) == "flex"
    assert resolve_attention_backend("auto", torch.device("cpu")) == "reference"
    assert resolve_attention_backend("flex", torch.device("cpu")) == "flex"
    with pytest.raises(ConfigError, match="unknown attention backend 'flesh'"):
        resolve_attention_backend("flesh", torch.device("cpu"))


@pytest.mark.parametrize("chunk", [None, 8])
def test_reference_backend_equals_dense_masked_attention(chunk):
    bs, heads, kv_heads, dim = 4, 4, 2, 8
    group = KVGroup("g", (0,), chunk, num_blocks=32)
    kv = KVManager([group], bs)
    g = torch.Generator().manual_seed(1)
    lengths, starts = [13, 5], [6, 0]  # one sequence decoding a chunk after 6 cached tokens, one prefilling
    seqs = []
    for n, (length, start) in enumerate(zip(lengths, starts, strict=True)):
        seq = Sequence(request_id=str(n), tokens=list(range(length + start)), num_prompt_tokens=length + start,
                       params=None, arrival=n, num_computed=start)
        seq.tables["g"] = [31 - 2 * b - n for b in range((length + start + bs - 1) // bs)]  # scattered, disjoint
        seqs.append(seq)
    backend = ReferenceBackend(kv, torch.device("cpu"))
    chunks = [ScheduledChunk.of(s, length) for s, length in zip(seqs, lengths, strict=True)]
    layout = backend.layout(group, chunks)
    k_cache = torch.zeros(32, bs, kv_heads, dim)
    v_cache = torch.zeros(32, bs, kv_heads, dim)
    full_k = [torch.randn(s.num_tokens, kv_heads, dim, generator=g) for s in seqs]
    full_v = [torch.randn(s.num_tokens, kv_heads, dim, generator=g) for s in seqs]
    for s, k, v in zip(seqs, full_k, full_v, strict=True):  # the whole history in the cache, as after the write
        for p in range(s.num_tokens):
            block = s.tables["g"][p // bs]
            k_cache[block, p % bs], v_cache[block, p % bs] = k[p], v[p]
    q = torch.randn(sum(lengths), heads, dim, generator=g)
    out = backend.forward(q, k_cache, v_cache, layout, scale=0.3)
    row = 0
    for s, start, length, k, v in zip(seqs, starts, lengths, full_k, full_v, strict=True):
        pos = torch.arange(s.num_tokens)
        mask = pos[None, :] <= pos[:, None]
        if chunk is not None:
            mask &= (pos // chunk)[None, :] == (pos // chunk)[:, None]
        qs = torch.zeros(s.num_tokens, heads, dim)
        qs[start:] = q[row : row + length]
        want = masked_attention(mask)(qs, k, v, 0.3)[start:]
        torch.testing.assert_close(out[row : row + length], want)
        row += length
