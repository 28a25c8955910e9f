"""`herd generate --offline`: one prompt through an in-process engine (no Ray)."""

from __future__ import annotations

import argparse
from pathlib import Path

from deployments.engine.config import EngineConfig
from deployments.engine.engine import Completion, Engine
from deployments.engine.inputs import image_digest, prepare_prompt
from deployments.engine.params import SamplingParams
from model.device import default_dtype
from model.errors import InvalidInputError
from model.image import ImageLimits, decode_image


def parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError as e:
        raise InvalidInputError(f"--prompt-ids must be comma-separated integers: {e}") from e


def run_offline(args: argparse.Namespace) -> Completion:
    dtype = default_dtype(args.device)
    chosen = {"attention_backend": args.attention_backend, "expert_kernel": args.expert_kernel}
    config = EngineConfig(**{k: v for k, v in chosen.items() if v is not None})
    engine = Engine.from_pretrained(args.model, config, device=args.device, dtype=dtype)
    tok = engine.tokenizer
    data = [Path(f).read_bytes() for f in args.image]
    ImageLimits().check_count(len(data))
    images = [decode_image(d) for d in data]
    if args.prompt is not None:
        ids = tok.encode(args.prompt, add_bos=True)
        missing = len(images) - sum(1 for t in ids if t == tok.image_ids.image)
        ids = ids[:1] + [tok.image_ids.image] * max(0, missing) + ids[1:]
    else:
        ids = parse_ids(args.prompt_ids)
    ids, inputs = prepare_prompt(engine.model, tok, ids, images, [image_digest(d) for d in data])
    params = SamplingParams.create(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                   top_k=args.top_k, seed=args.seed)
    [out] = engine.generate([ids], params, images=[inputs])
    return out
