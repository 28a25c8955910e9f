"""The flex attention backend equals the reference backend on random paged caches: causal and
chunked groups, batches mixing prefill chunks and decode rows, sequences crossing an attention
chunk boundary, sequences sharing prefix blocks, several batch sizes; GQA groups packed into the
query axis (2, and 3 as Llama 4's 5 is not a power of two). Compiled (two token buckets: <= 16 and <= 32 tokens)
and eager (which ignores the block list, so the mask alone must keep sequences apart). On the CPU
prefill steps go to one SDPA over gathered windows (gathered.py; `gather_prefill`) and decode-only
steps to `ring_decode`: tested both ways."""

import random

import pytest
import torch

from deployments.engine.attention.flex import FlexBackend
from deployments.engine.attention.gathered import GatheredLayout
from deployments.engine.attention.reference import ReferenceBackend
from deployments.engine.kv_manager import KVGroup, KVManager
from deployments.engine.scheduler import ScheduledChunk
from deployments.engine.sequence import Sequence

# the attention shape of the tiny presets and the engine parity tests' caches, so the compiled
# kernel of the 16-token bucket is shared with them
BS, HEADS, KV_HEADS, DIM, NUM_BLOCKS = 4, 4, 2, 16, 512
SCALE = DIM**-0.5

# (cached tokens before this step, new tokens) per sequence; the "sharing" batches share their
# first two blocks (8 tokens), as prefix-cache hits do
BATCHES = {
    "one decode": [(21, 1)],
    "one prefill across a chunk boundary": [(0, 13)],
    "prefill continuing after a chunk boundary": [(10, 6)],
    "mixed prefill and decode": [(6, 1), (0, 7), (17, 1), (3, 5), (30, 2)],
    "sixteen decodes sharing a prefix": [(random.Random(i).randrange(8, 40), 1) for i in range(16)],
    "prefill and decodes sharing a prefix": [(8, 8), (12, 1), (20, 1)],
    "32-token bucket": [(9, 1), (0, 12), (2, 14), (24, 3)],
}


def make_step(group: KVGroup, batch: list[tuple[int, int]], seed: int, shared_prefix: int = 0, heads: int = HEADS):
    """Sequences with scattered, disjoint block tables (the first `shared_prefix` blocks shared by
    all, as prefix caching does), a cache holding every position's KV, and the step's chunks.
    Blocks a chunked group has already freed are -1 in the tables, as the KV manager leaves them."""
    g = torch.Generator().manual_seed(seed)
    free = torch.randperm(NUM_BLOCKS, generator=g).tolist()
    shared = [free.pop() for _ in range(shared_prefix)]
    k_cache = torch.randn(NUM_BLOCKS, BS, KV_HEADS, DIM, generator=g)
    v_cache = torch.randn(NUM_BLOCKS, BS, KV_HEADS, DIM, generator=g)
    chunks = []
    for n, (cached, new) in enumerate(batch):
        total = cached + new
        seq = Sequence(request_id=str(n), tokens=list(range(total)), num_prompt_tokens=total, params=None,
                       arrival=n, num_computed=cached)
        num_blocks = (total + BS - 1) // BS
        table = [shared[b] if b < len(shared) else free.pop() for b in range(num_blocks)]
        if group.chunk is not None:  # blocks before the first query's chunk are freed
            first_needed = cached // group.chunk * group.chunk // BS
            table = [-1 if b < first_needed else block for b, block in enumerate(table)]
        seq.tables[group.name] = table
        chunks.append(ScheduledChunk.of(seq, new))
    q = torch.randn(sum(new for _, new in batch), heads, DIM, generator=g)
    return chunks, q, k_cache, v_cache


def attend(backend, group, chunks, q, k_cache, v_cache) -> torch.Tensor:
    layout = backend.layout(group, chunks)
    return backend.forward(q, k_cache, v_cache, layout, scale=SCALE)


@pytest.mark.parametrize("gather", [False, True], ids=["flex-only", "cpu-paths"])
@pytest.mark.parametrize("chunk", [None, 8], ids=["causal", "chunked"])
@pytest.mark.parametrize("batch", list(BATCHES), ids=list(BATCHES))
def test_compiled_flex_equals_reference(batch, chunk, gather):
    group = KVGroup("g", (0,), chunk, NUM_BLOCKS)
    kv = KVManager([group], BS)
    shared = 2 if "sharing" in batch else 0
    chunks, q, k_cache, v_cache = make_step(group, BATCHES[batch], seed=len(batch), shared_prefix=shared)
    want = attend(ReferenceBackend(kv, torch.device("cpu")), group, chunks, q, k_cache, v_cache)
    flex = FlexBackend(kv, torch.device("cpu"))
    flex.gather_prefill = flex.ring_decode = gather
    layout = flex.layout(group, chunks)
    assert isinstance(layout, GatheredLayout) == (gather and batch in GATHERED[chunk])
    assert getattr(layout, "decode", False) == (gather and all(new == 1 for _, new in BATCHES[batch]))
    got = flex.forward(q, k_cache, v_cache, layout, scale=SCALE)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert layout.slots.tolist() == ReferenceBackend(kv, torch.device("cpu")).layout(group, chunks).slots.tolist()


# the batches whose padded SDPA costs at most gathered.MAX_PADDING x their work (the others, and
# decode-only steps, do not); "mixed" ones run as two parts, decode rows and prefill chunks
_PREFILLS = {"one prefill across a chunk boundary", "prefill continuing after a chunk boundary",
             "prefill and decodes sharing a prefix"}
GATHERED = {None: _PREFILLS, 8: _PREFILLS | {"mixed prefill and decode", "32-token bucket"}}


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("chunk", [None, 8], ids=["causal", "chunked"])
def test_eager_flex_mask_alone_keeps_sequences_apart(chunk):
    """Eager, with a GQA group of 3 (as Llama 4's 5, not a power of two) packed into the query axis."""
    group = KVGroup("g", (0,), chunk, NUM_BLOCKS)
    kv = KVManager([group], BS)
    chunks, q, k_cache, v_cache = make_step(group, BATCHES["mixed prefill and decode"], seed=7, heads=3 * KV_HEADS)
    want = attend(ReferenceBackend(kv, torch.device("cpu")), group, chunks, q, k_cache, v_cache)
    got = attend(FlexBackend(kv, torch.device("cpu"), compiled=False), group, chunks, q, k_cache, v_cache)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_layout_slots_equal_the_reference_slots():
    group = KVGroup("g", (0,), 8, NUM_BLOCKS)
    kv = KVManager([group], BS)
    chunks, *_ = make_step(group, BATCHES["mixed prefill and decode"], seed=3)
    flex = FlexBackend(kv, torch.device("cpu")).layout(group, chunks)
    ref = ReferenceBackend(kv, torch.device("cpu")).layout(group, chunks)
    assert flex.slots.tolist() == ref.slots.tolist()
