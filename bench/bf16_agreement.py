"""bf16 vs fp32 on the same checkpoint: greedy top-1 agreement over N generated tokens,
teacher-forced (the bf16 engine is fed fp32's tokens, so one early difference does not derail the
rest; each step's bf16 argmax is compared with fp32's token). Prints the agreement per expert kernel.

    python bench/bf16_agreement.py                                  # small-scout, 4 x 64 tokens
    python bench/bf16_agreement.py --preset tiny-scout --expert-kernel grouped reference
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deployments.engine.config import EngineConfig
from deployments.engine.engine import Engine
from deployments.engine.params import SamplingParams
from deployments.engine.sampler import SampleResult
from model.expert_kernel import EXPERT_KERNELS
from model.synth import synthesize


def forced_argmax(engine: Engine, prompt: list[int], forced: list[int]) -> list[int]:
    """The engine's greedy choice at each step while it is fed `forced` as its tokens."""
    picks: list[int] = []

    def sample(logits, params, generators):
        picks.append(int(logits[0].argmax()))
        return SampleResult(torch.tensor([forced[len(picks) - 1]], device=logits.device), None)

    engine.sampler.sample = sample  # type: ignore[method-assign]
    engine.generate([prompt], SamplingParams(max_tokens=len(forced), temperature=0.0, ignore_eos=True))
    return picks


def agreement(path: Path, kernel: str, prompts: list[list[int]], new_tokens: int, device: str) -> float:
    cfg = EngineConfig(max_num_batched_tokens=256, expert_kernel=kernel)
    fp32 = Engine.from_pretrained(path, cfg, device=device, dtype=torch.float32)
    bf16 = Engine.from_pretrained(path, cfg, device=device, dtype=torch.bfloat16)
    same = total = 0
    for prompt in prompts:
        [want] = fp32.generate([prompt], SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True))
        got = forced_argmax(bf16, prompt, want.token_ids)
        same += sum(a == b for a, b in zip(got, want.token_ids, strict=True))
        total += len(got)
    return same / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small-scout")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64, help="per prompt")
    ap.add_argument("--expert-kernel", nargs="+", default=["grouped"], choices=sorted(EXPERT_KERNELS))
    args = ap.parse_args()
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randrange(8, 40))] for _ in range(args.prompts)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        synthesize(path, args.preset, seed=5, dtype=torch.float32, progress=False)
        for kernel in args.expert_kernel:
            rate = agreement(path, kernel, prompts, args.new_tokens, args.device)
            print(f"{args.preset}, {args.device}, expert kernel {kernel}: bf16 top-1 agreement with fp32 over "
                  f"{args.prompts * args.new_tokens} tokens: {rate:.2%}")


if __name__ == "__main__":
    main()
