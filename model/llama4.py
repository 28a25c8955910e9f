"""`Llama4`: the whole model (vision tower + projector + text decoder) with a whole-sequence,
cache-free forward. It is the numerical reference the engine is tested against, and the holder of
the weights the engine runs and of the checkpoint's image processor, which every caller uses."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from model.config import Llama4Config
from model.errors import InvalidInputError
from model.image import ImageProcessor
from model.processor_config import ImageProcessorConfig
from model.rope import text_inv_freq, text_rope
from model.text import TextModel, causal_masks, masked_attention
from model.vision import Projector, VisionModel


class Llama4(nn.Module):
    """`experts`: keep only this range of routed expert ids in every MoE layer (None: all);
    `expert_kernel`: the routed experts' kernel (model/expert_kernel.py).

    `image_processor`: the checkpoint's (`model.checkpoint.load` reads its preprocessor_config.json);
    None gives a vision model the default one for its tower, a text-only model none."""

    def __init__(self, cfg: Llama4Config, experts: range | None = None, expert_kernel: str = "reference",
                 image_processor: ImageProcessor | None = None):
        super().__init__()
        self.cfg = cfg
        self.language_model = TextModel(cfg.text, experts, expert_kernel)
        self.image_processor: ImageProcessor | None = None
        if cfg.vision is not None:
            self.vision_model = VisionModel(cfg.vision)
            self.multi_modal_projector = Projector(cfg.vision.vision_output_dim, cfg.text.hidden_size)
            self.image_processor = image_processor if image_processor is not None else default_image_processor(cfg)

    @property
    def device(self) -> torch.device:
        return self.language_model.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype activations run in (the embedding's: an FP8 checkpoint may store Linears, never it, in FP8)."""
        return self.language_model.model.embed_tokens.weight.dtype

    # ---- inputs ---------------------------------------------------------------------------
    def check_token_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Validate a 1D id tensor: non-empty, integral, every id in `[0, vocab_size)`."""
        ids = torch.as_tensor(input_ids)
        if ids.dim() != 1 or ids.numel() == 0:
            raise InvalidInputError(f"input_ids must be a non-empty 1D sequence, got shape {tuple(ids.shape)}")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise InvalidInputError(f"input_ids must be integers, got {ids.dtype}")
        vocab = self.cfg.text.vocab_size
        bad = (ids < 0) | (ids >= vocab)
        if bad.any():
            pos = int(bad.nonzero()[0])
            raise InvalidInputError(f"token id {int(ids[pos])} at position {pos} is outside the vocabulary "
                                    f"[0, {vocab})")
        return ids.to(device=self.device, dtype=torch.long)

    def preprocess_images(self, images: Sequence) -> torch.Tensor:
        """PIL images -> all their tiles `[N, 3, S, S]`, in order (each image's local tiles, then its global tile)."""
        if self.image_processor is None:
            raise InvalidInputError("this checkpoint has no vision tower: it cannot take images")
        return torch.cat([self.image_processor.preprocess(img).pixel_values for img in images])

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tiles `[N, 3, S, S]` -> text-width embeddings `[N * tokens_per_tile, hidden]`."""
        if self.cfg.vision is None:
            raise InvalidInputError("this checkpoint has no vision tower: it cannot take images")
        features = self.vision_model(pixel_values.to(self.device))  # [N, tokens, vision_out]
        return self.multi_modal_projector(features.flatten(0, 1))

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings `[T, hidden]`, with `image_embeds` rows replacing the `<|patch|>` positions in order."""
        x = self.language_model.model.embed_tokens(input_ids)
        if self.cfg.image_token_index is None:  # a text-only (llama4_text) checkpoint: no <|patch|> token
            patch = torch.zeros_like(input_ids, dtype=torch.bool)
        else:
            patch = input_ids == self.cfg.image_token_index
        num_patch = int(patch.sum())
        num_embeds = 0 if image_embeds is None else image_embeds.shape[0]
        if num_patch != num_embeds:
            raise InvalidInputError(
                f"the prompt has {num_patch} <|patch|> tokens but the images give {num_embeds} embeddings: "
                "expand each image's placeholder with model.prompt.expand_image_tokens"
            )
        if num_patch:
            assert image_embeds is not None  # num_embeds == num_patch > 0
            x = x.masked_scatter(patch[:, None], image_embeds.to(x.dtype))
        return x

    # ---- forward --------------------------------------------------------------------------
    def decode(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Run the decoder on embeddings `[T, hidden]` at absolute `positions`; returns fp32 logits `[T, vocab]`."""
        text = self.language_model
        rope = text_rope(text_inv_freq(text.cfg, x.device), positions)
        masks = causal_masks(text.cfg, positions)
        for i, layer in enumerate(text.model.layers):
            x = layer(x, positions, rope, masked_attention(masks[text.cfg.is_chunked(i)]))
        return text.logits(x)

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor | Sequence[int], images: Sequence | None = None) -> torch.Tensor:
        """Whole-sequence forward, no cache. `input_ids` already expanded (each image's
        `<|image_start|> ... <|patch|> ... <|image_end|>` run laid out as the Llama 4 processor
        does); `images` the PIL images in order, tiled and encoded here. Returns `[T, vocab]` fp32."""
        ids = self.check_token_ids(torch.as_tensor(input_ids))
        image_embeds = self.encode_images(self.preprocess_images(images)) if images else None
        x = self.embed(ids, image_embeds)
        positions = torch.arange(ids.shape[0], device=self.device)
        return self.decode(x, positions).float()


def default_image_processor(cfg: Llama4Config) -> ImageProcessor:
    """The processor of a checkpoint without a processor config: defaults, tiles of the tower's size."""
    assert cfg.vision is not None  # only vision checkpoints have an image processor
    return ImageProcessor.from_config(ImageProcessorConfig.default_for(cfg.vision))
