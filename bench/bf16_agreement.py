"""bf16 vs fp32 on the same checkpoint: greedy top-1 agreement over N generated tokens, through the
engine, teacher-forced: fp32 generates greedily (all prompts in one batch); the bf16 engine is fed
fp32's tokens, so one early difference does not derail the rest, and each step's bf16 argmax is
compared with fp32's token.

The checkpoint is synthesized in bf16 (as `herd synth` writes it), so both engines hold the same
weights and only the compute precision differs; `--weights fp32` synthesizes fp32 weights instead
(the bf16 engine then also rounds the weights). Agreement is also printed on the positions where
fp32's top-1 margin (best minus second-best logit) exceeds 0.05 / 0.1 / 0.2, with the margin
distribution, to tell near-ties from real disagreements.

    python bench/bf16_agreement.py                                  # small-scout, 4 x 64 = 256 tokens
    python bench/bf16_agreement.py --preset tiny-scout --prompts 16 --expert-kernel grouped reference
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deployments.engine.config import EngineConfig
from deployments.engine.engine import Engine
from deployments.engine.params import SamplingParams
from deployments.engine.sampler import SampleResult
from model.expert_kernel import EXPERT_KERNELS
from model.synth import synthesize

MARGINS = (0.05, 0.1, 0.2)


@dataclass
class Steps:
    tokens: list[int]  # the engine's argmax at each step
    margins: list[float]  # its top-1 minus top-2 logit


def greedy_steps(engine: Engine, prompts: list[list[int]], new_tokens: int,
                 forced: list[list[int]] | None = None) -> list[Steps]:
    """Per prompt (all run as one batch): the engine's argmax and top-1 margin at each of
    `new_tokens` steps, fed its own argmax (greedy) or that prompt's `forced` tokens."""
    params = [SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True) for _ in prompts]
    index = {id(p): i for i, p in enumerate(params)}  # the engine hands each row its request's params
    steps = [Steps([], []) for _ in prompts]

    def sample(logits, row_params, generators):
        top = logits.float().topk(2, dim=-1)
        ids, values = top.indices[:, 0].tolist(), (top.values[:, 0] - top.values[:, 1]).tolist()
        fed = []
        for row, p in enumerate(row_params):
            i = index[id(p)]
            steps[i].tokens.append(ids[row])
            steps[i].margins.append(values[row])
            fed.append(ids[row] if forced is None else forced[i][len(steps[i].tokens) - 1])
        return SampleResult(torch.tensor(fed, device=logits.device), None)

    engine.sampler.sample = sample  # type: ignore[method-assign]
    engine.generate(prompts, params)
    return steps


def report(name: str, same: torch.Tensor, margin: torch.Tensor) -> str:
    """One line: overall agreement, agreement on positions above each margin, and the flips' margins."""
    parts = [f"{name}: {same.float().mean():.2%} of {len(same)} ({int((~same).sum())} differ)"]
    for m in MARGINS:
        above = margin > m
        parts.append(f"margin > {m}: {same[above].float().mean():.2%} of {int(above.sum())}")
    flips = sorted(round(v, 3) for v in margin[~same].tolist())
    parts.append(f"fp32 margins where they differ: {flips}")
    return "; ".join(parts)


def measure(path: Path, kernel: str, prompts: list[list[int]], new_tokens: int,
            device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Per generated position (prompt by prompt): whether bf16's argmax is fp32's token `[N]`
    (bool), and fp32's top-1 margin there `[N]`."""
    cfg = EngineConfig(max_num_batched_tokens=256, expert_kernel=kernel)
    fp32 = Engine.from_pretrained(path, cfg, device=device, dtype=torch.float32)
    bf16 = Engine.from_pretrained(path, cfg, device=device, dtype=torch.bfloat16)
    want = greedy_steps(fp32, prompts, new_tokens)
    got = greedy_steps(bf16, prompts, new_tokens, forced=[w.tokens for w in want])
    same = [a == b for g, w in zip(got, want, strict=True) for a, b in zip(g.tokens, w.tokens, strict=True)]
    return torch.tensor(same), torch.tensor([m for w in want for m in w.margins])


def agreement(path: Path, kernel: str, prompts: list[list[int]], new_tokens: int, device: str) -> list[str]:
    s, m = measure(path, kernel, prompts, new_tokens, device)
    q = [f"{m.quantile(p):.3f}" for p in (0.1, 0.25, 0.5)]
    return [report("bf16 top-1 agreement with fp32", s, m),
            f"fp32 top-1 margin: 10/25/50% quantiles {' / '.join(q)}; share below 0.01 / 0.05: "
            f"{(m < 0.01).float().mean():.1%} / {(m < 0.05).float().mean():.1%}"]


def make_prompts(n: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(3, 500) for _ in range(rng.randrange(8, 40))] for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small-scout")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64, help="per prompt")
    ap.add_argument("--weights", choices=["bf16", "fp32"], default="bf16",
                    help="dtype of the synthesized weights (bf16: both engines run the same weights)")
    ap.add_argument("--seed", type=int, default=5, help="of the synthetic weights")
    ap.add_argument("--expert-kernel", nargs="+", default=["grouped"], choices=sorted(EXPERT_KERNELS))
    args = ap.parse_args()
    prompts = make_prompts(args.prompts)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        dtype = torch.bfloat16 if args.weights == "bf16" else torch.float32
        synthesize(path, args.preset, seed=args.seed, dtype=dtype, progress=False)
        for kernel in args.expert_kernel:
            lines = agreement(path, kernel, prompts, args.new_tokens, args.device)
            print(f"{args.preset} (seed {args.seed}, {args.weights} weights), {args.device}, expert kernel {kernel}, "
                  f"{args.prompts} prompts x {args.new_tokens} tokens, teacher-forced:")
            print("\n".join("  " + line for line in lines), flush=True)


if __name__ == "__main__":
    main()
