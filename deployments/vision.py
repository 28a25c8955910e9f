"""The VisionEncoder deployment: image bytes -> tiles -> vision tower -> projector, batched over
concurrent requests with `@serve.batch`, with an LRU cache of embeddings by image digest bounded in
bytes (`vision.cache_bytes`). Decoding and tiling an image run on a worker thread, never on the
replica's event loop (which keeps batching the others)."""

from __future__ import annotations

import asyncio

import torch
from ray import serve

from deployments.config import HerdConfig
from deployments.logs import route_to_serve_logs
from deployments.lru import LRUCache
from deployments.metrics import VisionMetrics
from model.checkpoint import load_vision
from model.device import default_dtype, resolve_device
from model.image import ImageLimits, decode_image


@serve.deployment
class VisionEncoder:
    def __init__(self, config: dict):
        route_to_serve_logs()
        cfg = HerdConfig.model_validate(config)
        self.device = resolve_device(cfg.device)
        dtype = default_dtype(self.device)
        self.tower = load_vision(cfg.model, device=self.device, dtype=dtype)
        self.processor = self.tower.image_processor  # from the checkpoint's preprocessor_config.json
        self.limits = ImageLimits(max_bytes=cfg.limits.max_image_bytes, max_pixels=cfg.limits.max_image_pixels)
        self.cache: LRUCache[str, tuple] = LRUCache(cfg.vision.cache_bytes, weigh=embedding_bytes)  # 0: no cache
        self.metrics = VisionMetrics()
        self.encode_batch.set_max_batch_size(cfg.vision.max_batch_size)
        self.encode_batch.set_batch_wait_timeout_s(cfg.vision.batch_wait_timeout_s)

    async def embed(self, digest: str, data: bytes) -> tuple[tuple[int, int], torch.Tensor]:
        """(aspect ratio in tiles, embeddings `[num_patch_tokens, hidden]` on the CPU)."""
        cached = self.cache.get(digest)
        if cached is not None:
            self.metrics.cache_hits.inc()
            return cached
        processed = await asyncio.to_thread(lambda: self.processor.preprocess(decode_image(data, self.limits)))
        result = (processed.aspect_ratio, await self.encode_batch(processed.pixel_values))
        self.cache.put(digest, result)
        return result

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def encode_batch(self, tiles: list[torch.Tensor]) -> list[torch.Tensor]:
        self.metrics.batch_size.observe(len(tiles))
        with torch.inference_mode():
            embeds = self.tower(torch.cat(tiles).to(self.device)).float().cpu()
        rows = [t.shape[0] * self.tower.cfg.vision.tokens_per_tile for t in tiles]
        return list(embeds.split(rows))


def embedding_bytes(entry: tuple[tuple[int, int], torch.Tensor]) -> int:
    """What a cached (aspect ratio, embeddings) entry holds in memory."""
    embeds = entry[1]
    return embeds.numel() * embeds.element_size() if isinstance(embeds, torch.Tensor) else 1
