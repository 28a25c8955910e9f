"""The Herd engine: paged KV cache, continuous batching with chunked prefill, sampling and
streaming, in one process without Ray (the router service embeds it).

    from deployments.engine import Engine, SamplingParams
    engine = Engine.from_pretrained("checkpoints/small-scout")
    print(engine.generate(["Hello"], SamplingParams(max_tokens=8, temperature=0))[0].text)
"""

from deployments.engine.config import EngineConfig
from deployments.engine.engine import Completion, Engine, EngineOverloaded
from deployments.engine.params import SamplingParams

__all__ = ["Completion", "Engine", "EngineConfig", "EngineOverloaded", "SamplingParams"]
