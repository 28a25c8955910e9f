"""The `herd` command line. Each subcommand lives in a small function; heavy imports happen
inside them so `herd --help` is instant."""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path

DTYPES = ("bfloat16", "float16", "float32")


def _add_synth(sub: argparse._SubParsersAction) -> None:
    from model.presets import PRESETS

    p = sub.add_parser(
        "synth",
        help="write a synthetic Llama 4 checkpoint in the Hugging Face layout",
        description="Write random weights of a named model shape, with config.json, tokenizer.json "
        "(byte-level BPE + every Llama 4 special token) and safetensors shards, exactly as a "
        "Hugging Face Llama 4 checkpoint is laid out. Deterministic for a seed.",
    )
    p.add_argument("--preset", required=True, choices=sorted(PRESETS), help="model shape")
    p.add_argument("--out", required=True, help="directory to write (created if missing)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--num-layers", type=int, help="shorten the decoder to N layers (keeps the layer pattern)")
    p.add_argument("--vocab-size", type=int, help="pad the vocabulary to N rows (e.g. 202048 as in Scout)")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="weight dtype (default bfloat16)")
    p.add_argument("--device", default="cpu", help="where to generate the weights, e.g. cuda (default cpu)")
    p.add_argument("--max-shard-gib", type=float, default=4.0, help="split weights into shards of at most this size")
    p.set_defaults(func=_synth)


def _synth(args: argparse.Namespace) -> int:
    import torch

    from model.synth import synthesize

    cfg = synthesize(
        args.out, args.preset, seed=args.seed, num_layers=args.num_layers, vocab_size=args.vocab_size,
        dtype=getattr(torch, args.dtype), device=args.device, max_shard_bytes=int(args.max_shard_gib * 2**30),
        progress=True,
    )
    t = cfg.text
    print(f"wrote {args.preset} to {args.out}: {t.num_hidden_layers} layers, hidden {t.hidden_size}, "
          f"{t.num_local_experts} experts, vocab {t.vocab_size}")
    return 0


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text from a prompt",
        description="Generate a completion. With --offline the engine runs in this process on the "
        "checkpoint given by --model (no Ray, no server).",
    )
    p.add_argument("--offline", action="store_true", help="run the engine in-process instead of calling the cluster")
    p.add_argument("--model", help="checkpoint directory (with --offline; else the served model's name)")
    p.add_argument("--address", default="127.0.0.1:9000", help="the cluster's gRPC endpoint (default 127.0.0.1:9000)")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (a BOS token is prepended)")
    prompt.add_argument("--prompt-ids", help="comma-separated prompt token ids, e.g. 1,2,3")
    p.add_argument("--image", action="append", default=[], metavar="FILE",
                   help="an image (repeatable); each <|image|> in the prompt marks where one goes, "
                        "missing placeholders are put at the start")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--seed", type=int, help="seed for reproducible sampling")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--json", action="store_true",
                   help='print {"token_ids": [...], "text": "...", "finish_reason": "..."} (generated ids only)')
    p.set_defaults(func=_generate)


def _generate(args: argparse.Namespace) -> int:
    import json

    if args.offline:
        if not args.model:
            raise SystemExit("herd generate --offline needs --model DIR")
        from cluster.offline import run_offline

        out = run_offline(args)
    else:
        out = _generate_remote(args)
    if args.json:
        print(json.dumps({"token_ids": out.token_ids, "text": out.text, "finish_reason": out.finish_reason}))
    elif args.offline:
        print(out.text)  # the remote path streamed it already
    return 0


def _generate_remote(args: argparse.Namespace):
    from types import SimpleNamespace

    from cluster.client import HerdClient, sampling, user_turn
    from cluster.offline import parse_ids
    from deployments.pb import herd_pb2 as pb

    params = sampling(args.max_tokens, args.temperature, args.top_p, args.top_k, args.seed)
    req = pb.GenerateRequest(model=args.model or "", sampling=params)
    if args.prompt_ids:
        req.prompt_token_ids.ids.extend(parse_ids(args.prompt_ids))
    elif args.image:
        req.chat.messages.append(user_turn(args.prompt, args.image))
    else:
        req.text = args.prompt
    token_ids, text, reason = [], [], ""
    for chunk in HerdClient(args.address).generate(req):
        token_ids += chunk.token_ids
        text.append(chunk.text)
        reason = chunk.finish_reason or reason
        if not args.json:
            print(chunk.text, end="", flush=True)
    if not args.json:
        print()
    return SimpleNamespace(token_ids=token_ids, text="".join(text), finish_reason=reason)


def _add_cluster_commands(sub: argparse._SubParsersAction) -> None:
    from cluster.launcher import Ports

    up = sub.add_parser(
        "up", help="start a local Ray head and deploy Herd on it",
        description="Check the checkpoint, the config and the resources, start a local Ray head and a "
        "redis-server (each only if none runs on its port), deploy the Herd Serve application, wait until it is "
        "healthy and print its endpoints. Without --model/--config the small synthetic Scout-shaped checkpoint "
        "is written (first run) and served. On a cluster that already serves Herd it refuses unless --replace; "
        "a replacement that fails to deploy is rolled back to the previous config. Exit status: 0 serving, "
        "1 refused or failed (one line saying why; nothing that this command started is left running).")
    src = up.add_mutually_exclusive_group()
    src.add_argument("--model", help="checkpoint directory to serve")
    src.add_argument("--preset", default="small-scout", help="synthetic checkpoint preset (default small-scout)")
    src.add_argument("--config", help="HerdConfig YAML file (the Serve application args)")
    up.add_argument("--replace", action="store_true",
                    help="redeploy over a herd application that is already serving (rolled back if it fails)")
    up.add_argument("--demo", action="store_true", help="send one demo request once it is up")
    defaults = Ports()
    for name, what in (("ray", "the Ray head (GCS)"), ("http", "the OpenAI HTTP API"), ("grpc", "the gRPC API"),
                       ("dashboard", "the Ray dashboard"), ("metrics", "the Prometheus metrics endpoint"),
                       ("redis", "the local redis-server")):
        up.add_argument(f"--{name}-port", type=int, metavar="PORT",
                        help=f"port of {what} (default {getattr(defaults, name)}; a running cluster keeps its own)")
    up.set_defaults(func=_up)
    sub.add_parser(
        "down", help="stop what `herd up` started",
        description="Stop the Ray head and the redis-server that `herd up` started (recorded in its state file). "
        "A Ray head or Redis that was already running is left running; only the herd application and its "
        "expert shards are removed from such a head.").set_defaults(func=_down)
    status = sub.add_parser(
        "status", help="model, deployments, replicas, expert shards, endpoints, Redis",
        description="What the herd cluster of this machine serves: the model and checkpoint, each deployment's "
        "replicas and their states, the expert shards and their nodes, the endpoints (HTTP, gRPC, the Ray "
        "dashboard and how to authenticate to it, Prometheus metrics) and the Redis tier's health. Exit status "
        "0 when a herd cluster runs, 1 when none does.")
    status.add_argument("--json", action="store_true", help="print it as JSON")
    status.set_defaults(func=_status)
    chat = sub.add_parser("chat", help="interactive chat with the cluster over gRPC",
                          description="Multi-turn chat over gRPC; an empty line or Ctrl-D ends it.")
    chat.add_argument("--address", default="127.0.0.1:9000", help="gRPC endpoint")
    chat.add_argument("--max-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.7)
    chat.add_argument("--image", action="append", default=[], metavar="FILE", help="attach to the first turn")
    chat.set_defaults(func=_chat)


def _up(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from cluster.launcher import ClusterError, ensure_checkpoint, up
    from deployments.config import HerdConfig
    from deployments.engine.validation import describe_validation_error

    try:
        if args.config:
            cfg = HerdConfig.from_file(args.config)
        else:
            cfg = HerdConfig(model=str(args.model or ensure_checkpoint(args.preset)))
    except ValidationError as e:
        where = f" {args.config}" if args.config else ""
        raise ClusterError(f"invalid config{where}: {describe_validation_error(e)} (the fields and their meaning: "
                           "deployments/config.py)") from None
    ports = {name: getattr(args, f"{name}_port") for name in ("ray", "http", "grpc", "dashboard", "metrics", "redis")}
    state = up(cfg, ports, replace_app=args.replace)
    print(f"herd is serving {cfg.model_name}")
    p = state.ports
    for name, url in (("http", f"http://127.0.0.1:{p.http}/v1"), ("grpc", f"127.0.0.1:{p.grpc}"),
                      ("dashboard", f"http://127.0.0.1:{p.dashboard}"),
                      ("metrics", f"http://127.0.0.1:{p.metrics}/metrics"), ("redis", state.redis_url or "none")):
        print(f"  {name:10s} {url}")
    print("`herd status` shows more (dashboard authentication, replicas); `herd down` stops it")
    if args.demo:
        _demo(f"127.0.0.1:{p.grpc}")
    return 0


def _demo(address: str) -> None:
    from cluster.client import HerdClient, sampling
    from deployments.pb import herd_pb2 as pb

    req = pb.GenerateRequest(text="Herd serves Llama 4 on Ray.", sampling=sampling(24, 0.0, 1.0, 0, None))
    text = "".join(c.text for c in HerdClient(address).generate(req))
    print(f"demo request -> {text!r}")


def _down(args: argparse.Namespace) -> int:
    from cluster.launcher import down

    for line in down():
        print(line)
    return 0


def _status(args: argparse.Namespace) -> int:
    import json

    from cluster.launcher import NOT_RUNNING, status

    info = status()
    if info is None:
        print(NOT_RUNNING, file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    model = info["model"]
    print(f"model        {model['name']} (checkpoint {model['checkpoint']}): {info['application']}")
    if "problem" in info:
        print(f"problem      {info['problem']}")
    for name, d in info["deployments"].items():
        replicas = ", ".join(f"{n} {state}" for state, n in d["replicas"].items()) or "no replicas"
        print(f"  {name:14s} {d['status']:10s} {replicas}")
    if info["expert_shards"] is not None:
        shards = info["expert_shards"]
        print(f"expert shards {len(shards)}" + "".join(
            f"\n  experts {s['experts']:8s} on node {s['node']} ({s['state']})" for s in shards))
    for name, url in info["endpoints"].items():
        print(f"{name:12s} {url}")
        if name == "dashboard":
            print(f"  authentication: {info['dashboard_auth']}")
    redis = info["redis"]
    extra = f", {redis['used_memory']} of {redis['maxmemory']} used, {redis['keys']} keys" if "keys" in redis else ""
    print(f"redis        {redis['url'] or 'none'}: {redis['health']}{extra}")
    head = info["ray_head"]
    print(f"ray head     {head['address']}, " + ("started by herd up (herd down stops it)" if head["started_by_herd"]
                                                 else "not started by herd (herd down leaves it running)"))
    return 0


def _chat(args: argparse.Namespace) -> int:
    from cluster.client import HerdClient, sampling, user_turn
    from deployments.pb import herd_pb2 as pb

    client, history, images = HerdClient(args.address), [], list(args.image)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        history.append(user_turn(line, images))
        images = []
        req = pb.GenerateRequest(sampling=sampling(args.max_tokens, args.temperature, 1.0, 0, None))
        req.chat.messages.extend(history)
        print("herd> ", end="", flush=True)
        answer = "".join(print(c.text, end="", flush=True) or c.text for c in client.generate(req))
        print()
        history.append(pb.ChatMessage(role="assistant", content=[pb.ContentPart(text=answer)]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="herd",
        description="Herd: serve Llama 4-class MoE multimodal models on Ray.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_synth(sub)
    _add_generate(sub)
    _add_cluster_commands(sub)
    _add_bench(sub)
    return parser


BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"
BENCHMARKS = {"engine": "engine_bench.py", "serving": "serving_bench.py", "dispatch": "dispatch_bench.py",
              "prefix-cache": "prefix_cache_bench.py"}


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a benchmark from bench/ (results: bench/RESULTS.md)",
                       description="Run one of the benchmarks in bench/ with the arguments that follow; "
                       "`herd bench NAME --help` lists them. " + ", ".join(
                           f"{name}: bench/{file}" for name, file in BENCHMARKS.items()) + ".")
    p.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="its arguments")
    p.set_defaults(func=_bench)


def _bench(args) -> int:
    script = BENCH_DIR / BENCHMARKS[args.name]
    if not script.is_file():
        raise OSError(f"{script} not found: `herd bench` runs from a source checkout (pip install -e .)")
    return subprocess.run([sys.executable, str(script), *args.bench_args]).returncode


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"herd {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the CLI's last line of defence: a message, not a trace
        from cluster.launcher import ClusterError
        from model.errors import HerdModelError

        if isinstance(e, ClusterError) and not args.verbose:
            print(f"herd {args.command}: error: {e}", file=sys.stderr)
            return 1

        if isinstance(e, (HerdModelError, ValueError, OSError)) and not args.verbose:
            print(f"herd {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
