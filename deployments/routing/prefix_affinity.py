"""Prefix-affinity request routing for the router service: a Ray Serve `RequestRouter`.

What: the DeploymentHandle the Ingress holds for the router service picks the replica of every
`generate` call with `PrefixAffinityRouter` instead of Serve's default power of two choices
(`cluster/app.py` sets it as the router service's `request_router_config` when `routing.policy` is
`prefix_affinity`).

Why: a router-service replica keeps the KV of what it prefilled in its local prefix cache (the Redis tier is
shared but slower). When the next turn of a long-document session lands on the replica that already
prefilled the document, only the new question is computed.

Policy, per request (`generate(request_id, prompt_ids, params, images, cache_salt, session_id)`):
  1. a `session_id` seen before -> the replica that served that session last;
  2. else the replica that last served the longest run of the prompt's leading chunks
     (`chunk_tokens` tokens each; the chunk hashes are chained, so a match is a true prefix, and
     salted by the tenant (`cache_salt`), so tenants never share affinity);
  3. the replica from 1 or 2 is used unless it is gone or overloaded (its ongoing requests >=
     `overload_fraction` x its `max_ongoing_requests`, or it does not answer the queue-length
     probe); then, and for prompts shorter than one chunk with no session, Serve's power of two
     choices picks the less loaded of two random candidates (not the overloaded one).
The replica that accepts the request (`on_request_routed`) is recorded for every full chunk of the
prompt and for the session, so the table says who served a prefix *last*. Both maps are LRUs of
bounded size. Image content is not part of the key (images are placeholder tokens in `prompt_ids`):
a collision only costs a cache miss, never a wrong answer, since the engine's own cache keys do
include image hashes.

Scope: the table lives in each DeploymentHandle's router, i.e. in each Ingress replica; with several
Ingress replicas every one learns affinity from the requests it routes itself. The table is only
updated from `on_request_routed`, which Serve calls on the (default) path where replicas may reject
requests (`max_ongoing_requests` enforced by the handle); from a Ray Client driver it is not called
and routing degrades to least-loaded.
"""

from __future__ import annotations

import hashlib
import logging
import random
from array import array
from collections.abc import Callable, Collection, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from ray.serve.request_router import (
    LocalityMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from deployments.lru import LRUCache

log = logging.getLogger(__name__)

_ROOT = b"herd-affinity-v1"  # 16 bytes: blake2b `person`, so the version is part of every hash


@dataclass(frozen=True)
class RequestKey:
    """What the table knows a request by."""

    chunks: tuple[bytes, ...]  # chained hashes of the prompt's full leading chunks
    session: tuple[str, str] | None  # (tenant salt, session id), None without a session


@dataclass(frozen=True)
class Match:
    replica: Hashable
    reason: str  # "session" | "prefix"
    chunks: int  # leading chunks matched (0 for a session match)


@dataclass(frozen=True)
class Decision:
    replica: Hashable | None  # None: the least-loaded candidate
    reason: str  # "session" | "prefix" | "overloaded" | "gone" | "none"


class AffinityTable:
    """Bounded LRU maps: chunk hash -> replica that last served a prompt starting with that run of
    chunks, and (tenant, session) -> replica that last served the session. Pure Python, no Serve."""

    def __init__(self, chunk_tokens: int = 256, max_prefix_entries: int = 100_000, max_sessions: int = 100_000):
        if chunk_tokens < 1 or max_prefix_entries < 1 or max_sessions < 1:
            raise ValueError("chunk_tokens, max_prefix_entries and max_sessions must be >= 1")
        self.chunk_tokens = chunk_tokens
        self.max_prefix_entries = max_prefix_entries
        self.max_sessions = max_sessions
        self._prefix: LRUCache[bytes, Hashable] = LRUCache(max_prefix_entries)
        self._sessions: LRUCache[tuple[str, str], Hashable] = LRUCache(max_sessions)

    def __len__(self) -> int:
        return len(self._prefix)

    @property
    def num_sessions(self) -> int:
        return len(self._sessions)

    def key(self, prompt_ids: Sequence[int], salt: str = "", session_id: str = "") -> RequestKey:
        """Chained hashes of the full `chunk_tokens`-token chunks of the prompt (a partial tail chunk
        is left out), rooted in the tenant salt."""
        c = self.chunk_tokens
        h = hashlib.blake2b(salt.encode(), digest_size=16, person=_ROOT).digest()
        chunks = []
        for start in range(0, len(prompt_ids) - c + 1, c):
            h = hashlib.blake2b(h + array("q", prompt_ids[start:start + c]).tobytes(), digest_size=16).digest()
            chunks.append(h)
        return RequestKey(tuple(chunks), (salt, session_id) if session_id else None)

    def lookup(self, key: RequestKey) -> Match | None:
        """The session's replica, else the replica that served the longest matching chunk run."""
        if key.session is not None and key.session in self._sessions:  # a lookup does not refresh recency
            return Match(self._sessions.peek(key.session), "session", 0)
        for i in range(len(key.chunks) - 1, -1, -1):
            replica = self._prefix.peek(key.chunks[i])
            if replica is not None:
                return Match(replica, "prefix", i + 1)
        return None

    def record(self, key: RequestKey, replica: Hashable) -> None:
        """`replica` served this request: it now owns every chunk run of the prompt and the session.
        Chunks go in from the last to the first, so that the leading ones (shared by the most
        requests) are the most recently used and the last to be evicted."""
        for h in reversed(key.chunks):
            self._prefix.put(h, replica)
        if key.session is not None:
            self._sessions.put(key.session, replica)


def is_overloaded(queue_len: int | None, max_ongoing: int, overload_fraction: float) -> bool:
    """A replica whose queue length is unknown (it did not answer) counts as overloaded."""
    return queue_len is None or queue_len >= overload_fraction * max_ongoing


def decide(match: Match | None, candidates: Collection[Hashable],
           load_of: Callable[[Hashable], tuple[int | None, int]], overload_fraction: float) -> Decision:
    """The policy: the affine replica unless it is no longer a candidate or overloaded; `None`
    means least-loaded. `load_of(replica)` is `(queue length or None, max_ongoing_requests)` and is
    only asked about the affine replica."""
    if match is None:
        return Decision(None, "none")
    if match.replica not in candidates:
        return Decision(None, "gone")
    if is_overloaded(*load_of(match.replica), overload_fraction):
        return Decision(None, "overloaded")
    return Decision(match.replica, match.reason)


def _arg(pr: PendingRequest, index: int, name: str, default: Any) -> Any:
    if len(pr.args) > index:
        return pr.args[index]
    return pr.kwargs.get(name, default)


class PrefixAffinityRouter(LocalityMixin, RequestRouter):
    """Serve request router of the router service (see the module docstring). No `FIFOMixin`: the
    replica chosen for a request must serve that request, not the head of the queue."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.initialize_state()

    def initialize_state(self, chunk_tokens: int = 256, overload_fraction: float = 0.5,
                         max_prefix_entries: int = 100_000, max_sessions: int = 100_000) -> None:
        """Called by Serve with `RequestRouterConfig.request_router_kwargs`."""
        self.table = AffinityTable(chunk_tokens, max_prefix_entries, max_sessions)
        self.overload_fraction = overload_fraction

    def request_key(self, pending_request: PendingRequest | None) -> RequestKey | None:
        """The table key of a `generate` call; None for anything else or for arguments that are not
        a prompt (routing never fails because of what a request carries)."""
        if pending_request is None or pending_request.metadata.call_method != "generate":
            return None
        try:
            prompt = _arg(pending_request, 1, "prompt_ids", ())
            salt = _arg(pending_request, 4, "cache_salt", "") or ""
            session = _arg(pending_request, 5, "session_id", "") or ""
            if not isinstance(prompt, (list, tuple)) or not isinstance(salt, str) or not isinstance(session, str):
                return None
            return self.table.key(prompt, salt, session)
        except (TypeError, ValueError, OverflowError):
            return None

    def _power_of_two(self, pending_request: PendingRequest | None,
                      exclude: ReplicaID | None = None) -> list[RunningReplica]:
        """Two random candidates (locality first, as Serve's default router does), never `exclude`
        unless it is the only one; Serve then takes the one with the shorter queue."""
        ids = [i for i in self.apply_locality_routing(pending_request) if i in self._replicas]
        others = [i for i in ids if i != exclude]
        ids = others or ids
        return [self._replicas[i] for i in random.sample(ids, min(2, len(ids)))]

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        key = self.request_key(pending_request)
        match = self.table.lookup(key) if key is not None else None
        if match is None:
            return [self._power_of_two(pending_request)]
        by_id = {r.replica_id: r for r in candidate_replicas}
        target = by_id.get(match.replica)
        if target is not None and self._replica_queue_len_cache.get(target.replica_id) is None:
            await self._probe_queue_lens([target], 0)  # fills the cache; no answer -> overloaded
        decision = decide(match, by_id, lambda rid: (self._replica_queue_len_cache.get(rid),
                                                     by_id[rid].max_ongoing_requests), self.overload_fraction)
        log.debug("request %s: %s -> %s", pending_request.metadata.request_id, decision.reason, decision.replica)
        if decision.replica is None:
            return [self._power_of_two(pending_request, exclude=match.replica)]
        # The affine replica first; should it be full after all, the least-loaded of the others.
        return [[target], self._power_of_two(pending_request, exclude=target.replica_id)]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        key = self.request_key(pending_request)
        if key is not None and (key.chunks or key.session is not None):
            self.table.record(key, replica_id)

