"""One request inside the engine: its tokens (prompt + generated), images, KV block tables,
progress and sampling state."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from deployments.engine.block_pool import block_hash, salted_root

if TYPE_CHECKING:
    from deployments.engine.kv_transfer import KVTransfer
    from deployments.engine.params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class ImageInput:
    """One image of a prompt: its projected embeddings (one row per `<|patch|>` token, in order)
    and a digest of its bytes (part of the prefix-cache key)."""

    embeds: torch.Tensor  # [num_patch_tokens, hidden]
    digest: str


@dataclass(kw_only=True)
class Sequence:
    """Built with keyword arguments. The scheduler owns the progress and KV fields (`status`,
    `num_computed`, `tables`, ...; through `KVManager`); the shared tier's state is `transfer`'s."""

    request_id: str
    tokens: list[int]
    num_prompt_tokens: int
    params: SamplingParams | None
    arrival: int
    patch_token_id: int | None = None
    images: list[ImageInput] = field(default_factory=list)
    cache_salt: str = ""
    generator: torch.Generator | None = None
    status: SeqStatus = SeqStatus.WAITING
    num_computed: int = 0  # tokens whose KV is in the cache
    num_cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache (both tiers)
    # Block table per KV group ("full": NoPE layers, every block of the history; "chunked": RoPE
    # layers, -1 for blocks of chunks already left behind).
    tables: dict[str, list[int]] = field(default_factory=dict)
    block_hashes: list[bytes] = field(default_factory=list)
    num_registered: int = 0  # leading full blocks already offered to the prefix cache
    num_preemptions: int = 0
    transfer: KVTransfer | None = None  # traffic with the shared tier, when the engine has one

    def __post_init__(self) -> None:
        self._patch_image = self._patch_owners()

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def append_token(self, token_id: int) -> None:
        """A sampled token joins the sequence (its KV is computed by the next step)."""
        self.tokens.append(token_id)

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.num_prompt_tokens

    @property
    def num_uncomputed(self) -> int:
        return len(self.tokens) - self.num_computed

    def _patch_owners(self) -> list[int]:
        """For each prompt position, the index of the image owning that `<|patch|>` (-1 elsewhere)."""
        owners = [-1] * self.num_prompt_tokens
        if not self.images:
            return owners
        bounds, total = [], 0
        for image in self.images:
            total += image.embeds.shape[0]
            bounds.append(total)
        k, img = 0, 0
        for pos, tok in enumerate(self.tokens[: self.num_prompt_tokens]):
            if tok == self.patch_token_id:
                while k >= bounds[img]:
                    img += 1
                owners[pos] = img
                k += 1
        return owners

    def image_rows(self, start: int, end: int) -> torch.Tensor | None:
        """Embedding rows for the `<|patch|>` tokens among positions `[start, end)`, in order."""
        owners = self._patch_owners_range(start, end)
        if not owners:
            return None
        before = sum(1 for o in self._patch_image[:start] if o >= 0)
        flat = torch.cat([img.embeds for img in self.images])
        return flat[before : before + len(owners)]

    def patch_offsets(self, start: int, end: int) -> list[int]:
        """Offsets from `start` of the `<|patch|>` tokens among positions `[start, end)` (the rows
        `image_rows` fills), found on the host."""
        if not self.images:
            return []
        return [i for i, o in enumerate(self._patch_image[start:min(end, self.num_prompt_tokens)]) if o >= 0]

    def _patch_owners_range(self, start: int, end: int) -> list[int]:
        return [o for o in self._patch_image[start:min(end, self.num_prompt_tokens)] if o >= 0]

    def hash_of_block(self, index: int, block_size: int) -> bytes:
        """Chained hash of full block `index` (computed once, in order)."""
        while len(self.block_hashes) <= index:
            b = len(self.block_hashes)
            parent = self.block_hashes[-1] if self.block_hashes else salted_root(self.cache_salt)
            start, end = b * block_size, (b + 1) * block_size
            extra = [self.images[i].digest for i in sorted(set(self._patch_owners_range(start, end)))]
            self.block_hashes.append(block_hash(parent, self.tokens[start:end], extra))
        return self.block_hashes[index]

    def block_tokens(self, index: int, block_size: int) -> list[int]:
        return self.tokens[index * block_size : (index + 1) * block_size]
