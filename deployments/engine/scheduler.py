"""Continuous batching with chunked prefill.

Every step spends a token budget: running sequences first (a decode is one token; an unfinished
prefill continues), in arrival order, then waiting ones are admitted while budget, sequence slots
and KV blocks last. When a running sequence cannot get a block, the latest arrival is preempted:
its blocks are freed (kept in the prefix cache) and it waits to be recomputed.

Blocks loaded from the shared prefix cache for a waiting sequence stay pinned until it is admitted.
Pins never block progress: when a running sequence or the head of the queue cannot get its blocks,
the pins of the other waiting sequences are dropped first (their blocks stay revivable in the local
prefix cache until evicted; at worst those requests recompute their prefix).

The scheduler owns each sequence's progress and KV bookkeeping: it schedules (`schedule`), records
what a step computed (`postprocess`), and finishes or preempts.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass

from deployments.engine.config import EngineConfig
from deployments.engine.kv_manager import KVManager
from deployments.engine.sequence import SeqStatus, Sequence


@dataclass(frozen=True)
class ScheduledChunk:
    """`seq.tokens[start : start + num_tokens]` run this step (`start` = `seq.num_computed` when
    scheduled); `samples`: the chunk ends at the last known token, so its logits pick the next."""

    seq: Sequence
    start: int
    num_tokens: int
    samples: bool

    @classmethod
    def of(cls, seq: Sequence, num_tokens: int) -> ScheduledChunk:
        start = seq.num_computed
        return cls(seq, start, num_tokens, start + num_tokens == seq.num_tokens)


class Scheduler:
    def __init__(self, cfg: EngineConfig, kv: KVManager):
        self.cfg = cfg
        self.kv = kv
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # sorted by arrival
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledChunk]:
        budget = self.cfg.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preemptions_before = self.num_preemptions
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SeqStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = min(seq.num_uncomputed, budget)
            if self._allocate_or_preempt(seq, n):
                chunks.append(ScheduledChunk.of(seq, n))
                budget -= n
        if self.num_preemptions == preemptions_before:  # no new admissions while KV is short
            self._admit(chunks, budget)
        return chunks

    def postprocess(self, chunks: list[ScheduledChunk]) -> None:
        """After a step ran `chunks`: their KV is computed; offer new chunks to the shared tier
        (before windowed blocks go), register full blocks in the prefix cache, free left-behind ones."""
        for c in chunks:
            c.seq.num_computed += c.num_tokens
            if c.seq.transfer is not None:
                c.seq.transfer.offer_computed()
            self.kv.after_step(c.seq)

    def _allocate_or_preempt(self, seq: Sequence, n: int) -> bool:
        """Allocate, preempting the latest arrivals until it fits; False if `seq` itself went."""
        while not self.kv.allocate(seq, n):
            if self._unpin_waiting():
                continue
            victim = self.running[-1]
            self.preempt(victim)
            if victim is seq:
                return False
        return True

    def _admit(self, chunks: list[ScheduledChunk], budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            seq = self.waiting[0]
            if self.cfg.enable_prefix_caching and not seq.tables:
                self._match_prefix(seq)
            n = min(seq.num_uncomputed, budget)
            if not self.kv.allocate(seq, n) and not (self._unpin_waiting(keep=seq) and self.kv.allocate(seq, n)):
                self._release(seq)
                break
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            bisect.insort(self.running, seq, key=lambda s: s.arrival)
            chunks.append(ScheduledChunk.of(seq, n))
            budget -= n

    def _unpin_waiting(self, keep: Sequence | None = None) -> bool:
        """Drop the pins of shared-cache chunks loaded for waiting sequences (except `keep`): their
        blocks become evictable prefix-cache entries. True if any pin was dropped."""
        dropped = False
        for seq in self.waiting:
            if seq is not keep and seq.transfer is not None and seq.transfer.pinned:
                seq.transfer.release()
                dropped = True
        return dropped

    def _match_prefix(self, seq: Sequence) -> None:
        hit = self.kv.match_prefix(seq)
        first_time = seq.num_preemptions == 0
        if first_time:
            seq.num_cached_prompt_tokens = min(hit, seq.num_prompt_tokens)
        if seq.transfer is not None:
            seq.transfer.admitted(hit, first_time)

    def preempt(self, seq: Sequence) -> None:
        """Free `seq`'s KV and queue it first for recomputation (its tokens are kept)."""
        self.running.remove(seq)
        self._release(seq)
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = SeqStatus.FINISHED

    def _release(self, seq: Sequence) -> None:
        if seq.transfer is not None:
            seq.transfer.release()
        self.kv.free(seq)
        seq.num_computed = 0

