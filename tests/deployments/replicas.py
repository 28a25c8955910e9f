"""Engine replicas of an expert group as threads of the test process, and the checkpoint the
expert-group tests share."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import torch

from deployments.engine.engine import Engine
from deployments.engine.params import SamplingParams
from deployments.expert_group import ExpertsUnavailable
from model.synth import synthesize


def top2_tiny_scout(path: Path, dtype: torch.dtype) -> Path:
    """tiny-scout (seed 7, `dtype`) with top-2 routing, so that a token's experts can sit on both shards."""
    synthesize(path, "tiny-scout", seed=7, dtype=dtype, progress=False)
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["num_experts_per_tok"] = 2
    (path / "config.json").write_text(json.dumps(config))
    return path


def run_replicas(engines: dict[str, Engine], prompts: dict, params: SamplingParams, leave: bool = True) -> dict:
    """Each engine generates its prompts on its own thread, then idles (an engine with nothing to do
    still steps with the group) until every engine is done; then each leaves the group (`leave`)."""
    got: dict = {}
    done = threading.Event()
    lock = threading.Lock()

    def serve(rid: str) -> None:
        out = [c.token_ids for c in engines[rid].generate(prompts[rid], params)]
        with lock:
            got[rid] = out
            if len(got) == len(engines):
                done.set()
        try:
            while not done.is_set():
                engines[rid].idle()
        except ExpertsUnavailable:  # the other replica finished and left the group
            pass
        finally:
            if leave:
                engines[rid].runner.experts.close()

    threads = [threading.Thread(target=serve, args=(rid,)) for rid in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not any(t.is_alive() for t in threads), "a replica hung"
    return got
