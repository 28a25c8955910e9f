"""The engine side of the shared prefix-cache tier: chunks exported by one engine and loaded into
another (a fresh replica) give exactly the tokens of a cold run, skip the loaded prefill, store
windowed-layer KV only where a resuming request reads it, and leak no blocks."""

import pytest
import torch

from deployments.engine.config import EngineConfig
from deployments.engine.engine import Engine
from deployments.engine.kv_manager import KVGroup
from deployments.engine.kv_transfer import ChunkPolicy, KVChunk
from deployments.engine.params import SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0)
CHUNK = 16  # tokens per shared chunk; the checkpoint's attention chunk is 8


class DictSink:
    """An in-memory tier: the engine's contract without Redis (Redis is covered in tests/cluster)."""

    chunk_tokens = CHUNK

    def __init__(self, accept: bool = True):
        self.chunks: dict[bytes, KVChunk] = {}
        self.accept = accept

    def ready(self) -> bool:
        return self.accept

    def put(self, seq, chunk: KVChunk) -> None:
        self.chunks[chunk.digest] = chunk


def engine_with(path, sink) -> Engine:
    engine = Engine.from_pretrained(path, EngineConfig(block_size=4, max_num_batched_tokens=24, kv_cache_bytes=2**22))
    engine.attach_shared_cache(sink)
    return engine


def fetch(engine: Engine, sink: DictSink, ids, salt: str = "") -> tuple[list[KVChunk], int]:
    digests, local = engine.prefix_chunks(ids, cache_salt=salt)
    found = []
    for d in digests[local:]:
        if d not in sink.chunks:
            break
        found.append(sink.chunks[d])
    return found, local


def run(engine: Engine, ids, chunks=(), salt: str = ""):
    rid = engine.add_request(ids, GREEDY, cache_salt=salt, shared_chunks=chunks, num_shared_chunks=len(chunks))
    outs = []
    while engine.has_unfinished():
        outs += [o for o in engine.step() if o.request_id == rid]
    return [t for o in outs for t in o.token_ids], outs[-1]


@pytest.fixture(scope="module")
def doc(scout_ckpt):
    g = torch.Generator().manual_seed(3)
    return torch.randint(10, 200, (86,), generator=g).tolist()


@pytest.fixture(scope="module")
def long_window_ckpt(tmp_path_factory):
    """Attention windows (32) longer than a shared chunk (16): windowed KV crosses the tier too."""
    from tests.deployments.engine.conftest import make_checkpoint

    return make_checkpoint(tmp_path_factory, "tiny-scout", chunk=32)


@pytest.mark.parametrize("ckpt", ["scout_ckpt", "long_window_ckpt"])
def test_loaded_chunks_give_the_cold_tokens(request, ckpt, doc):
    _, path = request.getfixturevalue(ckpt)
    sink = DictSink()
    writer = engine_with(path, sink)
    run(writer, doc + [5, 6, 7])
    assert len(sink.chunks) == (len(doc) + 3 - 1) // CHUNK  # every full prompt chunk but the last token's
    windowed = [c.index for c in sink.chunks.values() if "chunked" in c.kv]
    assert windowed == ([] if ckpt == "scout_ckpt" else [4])  # 5 chunks end at 80: only [64, 80) is in that window

    question = doc + [9, 8, 7, 6]
    cold, _ = run(engine_with(path, DictSink(accept=False)), question)
    reader = engine_with(path, DictSink(accept=False))
    chunks, local = fetch(reader, sink, question)
    assert local == 0 and len(chunks) == len(doc) // CHUNK
    warm, last = run(reader, question, chunks)
    assert warm == cold
    assert last.num_cached_tokens_shared == last.num_cached_tokens == len(chunks) * CHUNK
    for pool in reader.kv.pools.values():  # everything released (cached entries stay revivable)
        assert pool.num_used == 0 and not any(pool.ref_counts)


def test_tenants_never_share_chunks(scout_ckpt, doc):
    _, path = scout_ckpt
    sink = DictSink()
    run(engine_with(path, sink), doc + [1], salt="tenant-a")
    reader = engine_with(path, DictSink(accept=False))
    assert fetch(reader, sink, doc + [2], salt="tenant-b")[0] == []
    assert fetch(reader, sink, doc + [2], salt="tenant-a")[0]


def test_windowed_layers_are_stored_only_near_the_prefix_end():
    groups = [KVGroup("full", (3,), None, 8), KVGroup("chunked", (0, 1, 2), 32, 8)]
    policy = ChunkPolicy(chunk_tokens=16, block_size=4)
    # 5 chunks = 80 tokens: the prefix ends in the window [64, 96); chunk 4 starts at 64.
    assert ([[g.name for g in policy.groups_for(groups, j, 5)] for j in range(5)]
            == [["full"]] * 4 + [["full", "chunked"]])
    # a prefix ending on a window boundary needs no windowed KV at all
    assert all([g.name for g in policy.groups_for(groups, j, 4)] == ["full"] for j in range(4))
    with pytest.raises(ValueError, match="multiple of the KV block size"):
        ChunkPolicy(chunk_tokens=10, block_size=4)


def test_a_request_aborted_before_admission_releases_its_loaded_blocks(scout_ckpt, doc):
    _, path = scout_ckpt
    sink = DictSink()
    run(engine_with(path, sink), doc + [1])
    reader = engine_with(path, DictSink(accept=False))
    chunks, _ = fetch(reader, sink, doc + [2])
    rid = reader.add_request(doc + [2], GREEDY, shared_chunks=chunks)
    pinned = sum(sum(1 for r in pool.ref_counts if r) for pool in reader.kv.pools.values())
    assert pinned >= len(chunks) * CHUNK // 4  # the full group's blocks at least
    assert reader.abort(rid)
    for pool in reader.kv.pools.values():
        assert not any(pool.ref_counts)  # unpinned
    assert reader.kv.pools["full"].num_cached >= len(chunks) * CHUNK // 4  # still revivable


@pytest.mark.parametrize("ckpt", ["scout_ckpt", "long_window_ckpt"])
def test_the_next_chat_turn_loads_the_generated_answer_too(request, ckpt):
    """Chunks of generated tokens are offered as well: the next turn (prompt + answer + new
    question) loads them instead of prefilling the answer again."""
    _, path = request.getfixturevalue(ckpt)
    sink = DictSink()
    writer = engine_with(path, sink)
    prompt = torch.randint(10, 200, (30,), generator=torch.Generator().manual_seed(8)).tolist()
    rid = writer.add_request(prompt, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    answer = []
    while writer.has_unfinished():
        answer += [t for o in writer.step() if o.request_id == rid for t in o.token_ids]
    assert len(sink.chunks) == (len(prompt) + len(answer) - 1) // CHUNK == 4  # past the 30-token prompt
    next_turn = prompt + answer + [3, 4, 5]
    reader = engine_with(path, DictSink(accept=False))
    chunks, _ = fetch(reader, sink, next_turn)
    warm, last = run(reader, next_turn, chunks)
    assert last.num_cached_tokens_shared == 4 * CHUNK
    assert warm == run(engine_with(path, DictSink(accept=False)), next_turn)[0]


def test_a_full_pool_loads_the_leading_chunks_that_fit(scout_ckpt, doc):
    _, path = scout_ckpt
    sink = DictSink()
    run(engine_with(path, sink), doc + [1])
    reader = Engine.from_pretrained(path, EngineConfig(block_size=4, max_num_batched_tokens=24, num_blocks_full=32,
                                                       num_blocks_chunked=32))
    reader.attach_shared_cache(DictSink(accept=False))
    chunks, _ = fetch(reader, sink, doc + [2])
    assert len(chunks) == 5  # 80 tokens = 20 full-group blocks
    held = [reader.kv.pools["full"].allocate() for _ in range(18)]  # another request's blocks: 14 left
    rid = reader.add_request(doc + [2], GREEDY, shared_chunks=chunks)
    assert reader.scheduler.waiting[0].transfer.loaded_span == (0, 3 * CHUNK)  # 12 blocks loaded, chunk 3 did not fit
    for block in held:
        reader.kv.pools["full"].free(block)
    outs = []
    while reader.has_unfinished():
        outs += [o for o in reader.step() if o.request_id == rid]
    cold = Engine.from_pretrained(path, EngineConfig(block_size=4, max_num_batched_tokens=24))
    assert [t for o in outs for t in o.token_ids] == run(cold, doc + [2])[0]
    assert outs[-1].num_cached_tokens_shared == 3 * CHUNK
    assert not any(reader.kv.pools["full"].ref_counts)


def test_pinned_loads_of_waiting_requests_never_block_the_queue_head(scout_ckpt):
    """Chunks loaded for waiting requests fill the pool: the head of the queue (which loaded nothing)
    still gets admitted (the others' pins are dropped), and every request ends with its cold tokens
    and no block left referenced. Before, the head waited forever and `step` did nothing."""
    _, path = scout_ckpt
    g = torch.Generator().manual_seed(11)
    docs = [torch.randint(10, 200, (81,), generator=g).tolist() for _ in range(2)]  # 5 chunks = 20 blocks each
    sink = DictSink()
    writer = engine_with(path, sink)
    for d in docs:
        run(writer, d)
    cfg = EngineConfig(block_size=4, max_num_batched_tokens=24, num_blocks_full=32, num_blocks_chunked=32)
    reader = Engine.from_pretrained(path, cfg)
    reader.attach_shared_cache(DictSink(accept=False))
    head = torch.randint(10, 200, (30,), generator=g).tolist()
    prompts = [head] + [d + [7] for d in docs]
    rids = [reader.add_request(head, GREEDY)]
    for p in prompts[1:]:
        chunks, _ = fetch(reader, sink, p)
        rids.append(reader.add_request(p, GREEDY, shared_chunks=chunks))
    assert reader.kv.pools["full"].num_free == 0  # 20 + 12 loaded blocks pinned: the head cannot start
    got: dict[str, list[int]] = {r: [] for r in rids}
    for _ in range(200):  # bounded: a stuck engine fails here instead of hanging
        if not reader.has_unfinished():
            break
        for o in reader.step():
            got[o.request_id] += o.token_ids
    assert not reader.has_unfinished(), "the queue head was never admitted"
    cold = Engine.from_pretrained(path, EngineConfig(block_size=4, max_num_batched_tokens=24))
    assert [got[r] for r in rids] == [c.token_ids for c in cold.generate(prompts, GREEDY)]
    for pool in reader.kv.pools.values():
        assert pool.num_used == 0 and not any(pool.ref_counts)
