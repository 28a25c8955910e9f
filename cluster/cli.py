"""The `herd` command line. Each subcommand lives in a small function; heavy imports happen
inside them so `herd --help` is instant."""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import traceback
from pathlib import Path

from cluster.errors import EXIT_BUG, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_STATUS_HELP, CliError, UsageError

DTYPES = ("bfloat16", "float16", "float32")
API_KEY_HELP = "API key (default: $HERD_API_KEY, else the admin key that `herd up` made on this machine)"


def _add_synth(sub: argparse._SubParsersAction) -> None:
    from model.presets import PRESETS

    p = sub.add_parser(
        "synth",
        help="write a synthetic Llama 4 checkpoint in the Hugging Face layout",
        description="Write random weights of a named model shape, with config.json, tokenizer.json "
        "(byte-level BPE + every Llama 4 special token) and safetensors shards, exactly as a "
        "Hugging Face Llama 4 checkpoint is laid out. Deterministic for a seed. With --config-only no "
        "weights are written: enough for `herd plan`, e.g. "
        "`herd synth --preset maverick --config-only --out ckpt/maverick-config`.",
    )
    p.add_argument("--preset", required=True, choices=sorted(PRESETS), help="model shape")
    p.add_argument("--out", required=True, help="directory to write (created if missing)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--num-layers", type=int, help="shorten the decoder to N layers (keeps the layer pattern)")
    p.add_argument("--vocab-size", type=int, help="pad the vocabulary to N rows (e.g. 202048 as in Scout)")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="weight dtype (default bfloat16)")
    p.add_argument("--device", default="cpu", help="where to generate the weights, e.g. cuda (default cpu)")
    p.add_argument("--max-shard-gib", type=float, default=4.0, help="split weights into shards of at most this size")
    p.add_argument("--config-only", action="store_true",
                   help="write config.json, generation_config.json, the tokenizer and preprocessor files but no "
                        "weights (removes any already there); scout and maverick then default to their real "
                        "vocabulary of 202048 rows")
    p.set_defaults(func=_synth)


def _synth(args: argparse.Namespace) -> int:
    import torch

    from model.synth import synthesize

    cfg = synthesize(
        args.out, args.preset, seed=args.seed, num_layers=args.num_layers, vocab_size=args.vocab_size,
        dtype=getattr(torch, args.dtype), device=args.device, max_shard_bytes=int(args.max_shard_gib * 2**30),
        progress=True, config_only=args.config_only,
    )
    t = cfg.text
    what = f"the {args.preset} config (no weights)" if args.config_only else args.preset
    print(f"wrote {what} to {args.out}: {t.num_hidden_layers} layers, hidden {t.hidden_size}, "
          f"{t.num_local_experts} experts, vocab {t.vocab_size}")
    return 0


def _add_generate(sub: argparse._SubParsersAction) -> None:
    from deployments.engine.attention.registry import ATTENTION_BACKENDS
    from model.expert_kernel import KERNEL_CHOICES

    p = sub.add_parser(
        "generate",
        help="generate text from a prompt",
        description="Generate a completion. With --offline the engine runs in this process on the "
        "checkpoint given by --model (no Ray, no server).",
    )
    p.add_argument("--offline", action="store_true", help="run the engine in-process instead of calling the cluster")
    p.add_argument("--model", help="checkpoint directory (with --offline; else the served model's name)")
    p.add_argument("--address", default="127.0.0.1:9000", help="the cluster's gRPC endpoint (default 127.0.0.1:9000)")
    p.add_argument("--api-key", help=API_KEY_HELP)
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (a BOS token is prepended)")
    prompt.add_argument("--prompt-file", metavar="FILE",
                        help="read the prompt text from FILE (UTF-8), `-` for stdin; trailing line breaks are "
                             "dropped, as `$(cat FILE)` does (for prompts too long for the command line)")
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
    p.add_argument("--attention-backend", choices=[*sorted(ATTENTION_BACKENDS), "auto"],
                   help="with --offline: attention over the paged KV cache (engine.attention_backend; auto: "
                        "flex on CUDA, reference elsewhere; default: the engine's)")
    p.add_argument("--expert-kernel", choices=list(KERNEL_CHOICES),
                   help="with --offline: the routed experts' kernel (engine.expert_kernel; default auto: grouped "
                        "on CUDA, reference elsewhere)")
    p.add_argument("--json", action="store_true",
                   help='print {"token_ids": [...], "text": "...", "finish_reason": "..."} (generated ids only)')
    p.set_defaults(func=_generate)


def _generate(args: argparse.Namespace) -> int:
    import json

    if args.prompt_file is not None:
        args.prompt = read_prompt_file(args.prompt_file)
    if args.offline:
        if not args.model:
            raise UsageError("--offline needs --model DIR (the checkpoint to run)")
        from cluster.offline import run_offline

        out = run_offline(args)
    else:
        out = _generate_remote(args)
    if args.json:
        print(json.dumps({"token_ids": out.token_ids, "text": out.text, "finish_reason": out.finish_reason}))
    elif args.offline:
        print(out.text)  # the remote path streamed it already
    return 0


def read_prompt_file(path: str) -> str:
    """The prompt in FILE (`-`: stdin), UTF-8, without its trailing line breaks."""
    name = "stdin" if path == "-" else path
    try:
        data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as e:
        raise CliError(f"--prompt-file: cannot read {name}: {e.strerror or e}") from e
    try:
        text = data.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise CliError(f"--prompt-file: {name} is not UTF-8 text ({e})") from e
    if not text:
        raise CliError(f"--prompt-file: {name} is empty")
    return text


def _generate_remote(args: argparse.Namespace):
    from types import SimpleNamespace

    from cluster.client import HerdClient, sampling, user_turn
    from cluster.keys import client_api_key
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
    try:
        for chunk in HerdClient(args.address, api_key=client_api_key(args.api_key)).generate(req):
            token_ids += chunk.token_ids
            text.append(chunk.text)
            reason = chunk.finish_reason or reason
            if not args.json:
                print(chunk.text, end="", flush=True)
    finally:
        if text and not args.json:
            print(flush=True)  # ends the streamed line, also before an error message
    if not text and not args.json:
        print()
    return SimpleNamespace(token_ids=token_ids, text="".join(text), finish_reason=reason)


def _add_plan(sub: argparse._SubParsersAction) -> None:
    from cluster.plan import DEFAULT_HEADROOM, DTYPES

    p = sub.add_parser(
        "plan",
        help="size a deployment: parameters, GPU memory, expert shards, KV capacity",
        description="From a checkpoint's config.json alone (no weights), size what serving it takes: the "
        "attention/dense part, routed experts and vision tower in bytes; total and active (per token) "
        "parameters; the expert shards (one GPU each) and router-service replicas (one GPU each, holding the "
        "dense part, the vision tower and their KV cache); KV bytes per token and tokens per replica; whether it "
        "fits the GPUs, and what to change when not. Weights are sized in the config's torch_dtype (bf16 when "
        "absent); quantized checkpoints are out of scope. Exit status: 0 fits, 1 does not (each warning says "
        "what to change) or the checkpoint is bad, 2 bad arguments. Example: "
        "`herd synth --preset scout --config-only --out ckpt/scout && "
        "herd plan --model ckpt/scout --gpus 8 --gpu-memory 80`.",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="checkpoint directory (only config.json is read)")
    p.add_argument("--gpus", required=True, type=int, metavar="N", help="GPUs available")
    p.add_argument("--gpu-memory", required=True, type=float, metavar="GiB", help="memory of one GPU in GiB, e.g. 80")
    p.add_argument("--kv-dtype", choices=list(DTYPES), default="bf16",
                   help="KV cache dtype (default bf16; the engine keeps KV in the model dtype, others are what-ifs)")
    p.add_argument("--replicas", type=int, default=1, metavar="R", help="router-service replicas (default 1)")
    p.add_argument("--expert-shards", type=int, metavar="S",
                   help="expert shards to check (0 = experts colocated in each replica; default: the fewest that fit)")
    p.add_argument("--headroom", type=float, default=DEFAULT_HEADROOM, metavar="FRACTION",
                   help=f"fraction of each GPU kept free for activations (default {DEFAULT_HEADROOM})")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=_plan)


def _plan(args: argparse.Namespace) -> int:
    import json

    from cluster.plan import format_plan, make_plan, read_weight_dtype
    from model.config import Llama4Config

    if args.gpu_memory <= 0:
        raise UsageError(f"--gpu-memory must be positive, got {args.gpu_memory}")
    cfg = Llama4Config.from_dir(args.model)
    weight_dtype = read_weight_dtype(args.model)
    try:
        plan = make_plan(cfg, args.gpus, int(args.gpu_memory * 2**30), weight_dtype=weight_dtype,
                         kv_dtype=args.kv_dtype, replicas=args.replicas, headroom=args.headroom,
                         num_expert_shards=args.expert_shards)
    except ValueError as e:  # arguments that do not go together (gpus 0, headroom >= 1, ...)
        raise UsageError(str(e)) from e
    print(json.dumps(plan.to_dict()) if args.json else format_plan(plan, Path(args.model).name))
    return 0 if plan.fits else 1


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
    up.add_argument("--no-auth", action="store_true",
                    help="serve without API keys (local play only: anyone who reaches the ports is served and names "
                         "its own tenant). By default clients need a key; the first `herd up` makes an admin key and "
                         "prints it once")
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
                          description="Multi-turn chat over gRPC; an empty line, Ctrl-D or Ctrl-C ends it "
                          "(exit status 0). When stdin is not a terminal each non-empty line read from it "
                          "is one user turn, echoed as `you> LINE`, until end of input: "
                          "`printf 'Hi\\nAnd then?\\n' | herd chat`. Answers are printed on `herd> ` lines.")
    chat.add_argument("--address", default="127.0.0.1:9000", help="gRPC endpoint")
    chat.add_argument("--api-key", help=API_KEY_HELP)
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
        if args.no_auth:
            cfg = cfg.model_copy(update={"auth": cfg.auth.model_copy(update={"enabled": False})})
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
    from cluster.keys import client_api_key
    from deployments.pb import herd_pb2 as pb

    req = pb.GenerateRequest(text="Herd serves Llama 4 on Ray.", sampling=sampling(24, 0.0, 1.0, 0, None))
    text = "".join(c.text for c in HerdClient(address, api_key=client_api_key()).generate(req))
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
    print(f"api auth     {info['api_auth']}")
    redis = info["redis"]
    extra = f", {redis['used_memory']} of {redis['maxmemory']} used, {redis['keys']} keys" if "keys" in redis else ""
    print(f"redis        {redis['url'] or 'none'}: {redis['health']}{extra}")
    head = info["ray_head"]
    print(f"ray head     {head['address']}, " + ("started by herd up (herd down stops it)" if head["started_by_herd"]
                                                 else "not started by herd (herd down leaves it running)"))
    return 0


def _chat(args: argparse.Namespace) -> int:
    from cluster.client import HerdClient, sampling, user_turn
    from cluster.keys import client_api_key
    from deployments.pb import herd_pb2 as pb

    client, history, images = HerdClient(args.address, api_key=client_api_key(args.api_key)), [], list(args.image)
    models = client.list_models()  # nothing answers: exit now, not after the first turn is typed
    interactive = sys.stdin.isatty()
    if interactive:
        served = ", ".join(m.id for m in models) or "?"
        print(f"chatting with {served} at {args.address}; an empty line or Ctrl-D ends", file=sys.stderr)
    try:
        for line in _user_turns(interactive):
            history.append(user_turn(line, images))
            images = []
            req = pb.GenerateRequest(sampling=sampling(args.max_tokens, args.temperature, 1.0, 0, None))
            req.chat.messages.extend(history)
            answer = PrefixedLines("herd> ")
            try:
                for chunk in client.generate(req):
                    answer.write(chunk.text)
            except BaseException:
                answer.finish_line()  # the error message goes below what was printed
                raise
            answer.end()
            history.append(pb.ChatMessage(role="assistant", content=[pb.ContentPart(text=answer.text)]))
    except KeyboardInterrupt:
        print(flush=True)  # Ctrl-C ends the chat like Ctrl-D
    return 0


def _user_turns(interactive: bool):
    """The user's turns: typed after a `you> ` prompt (an empty line or Ctrl-D ends), or, when stdin
    is not a terminal, its non-empty lines, echoed as `you> LINE` so the output reads as a transcript."""
    if not interactive:
        for raw in sys.stdin:
            line = raw.strip()
            if line:
                print(f"you> {line}", flush=True)
                yield line
        return
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()  # Ctrl-D leaves the cursor after the prompt
            return
        if not line:
            return
        yield line


class PrefixedLines:
    """Streams text to stdout with `prefix` at the start of every line; `end()` finishes the last line."""

    def __init__(self, prefix: str):
        self.prefix, self.parts, self.at_line_start = prefix, [], True

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def write(self, text: str) -> None:
        self.parts.append(text)
        for piece in text.splitlines(keepends=True):
            if self.at_line_start:
                sys.stdout.write(self.prefix)
            sys.stdout.write(piece)
            self.at_line_start = piece.endswith("\n")
        sys.stdout.flush()

    def end(self) -> None:
        if not any(self.parts):
            sys.stdout.write(self.prefix)  # an empty answer still gets its line
            self.at_line_start = False
        self.finish_line()

    def finish_line(self) -> None:
        if not self.at_line_start:
            sys.stdout.write("\n")
            self.at_line_start = True
        sys.stdout.flush()


def _add_keys(sub: argparse._SubParsersAction) -> None:
    keys = sub.add_parser(
        "keys", help="API keys: add one for a tenant, list them, revoke one",
        description="Manage the API keys of a key store (by default the one of the cluster `herd up` runs here, "
        "$HERD_HOME/keys.json). The store holds SHA-256 hashes, never keys: a key is shown once, when it is made. "
        "A running cluster reads the store again when it changes: added and revoked keys take effect at once. "
        "For Kubernetes, write a file with --keys-file and put it in the Secret the chart reads (k8s/README.md).")
    ksub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    add = ksub.add_parser("add", help="make a key for a tenant and print it (once)",
                          description="Make a random key for TENANT, store its hash and print the key on stdout "
                          "(`key=$(herd keys add --tenant acme)`); its id goes to stderr.")
    add.add_argument("--tenant", required=True, help="the tenant whose requests (and prefix cache) the key opens")
    add.add_argument("--admin", action="store_true", help="an admin key: may also act for any tenant it names")
    add.set_defaults(func=_keys_add)
    lst = ksub.add_parser("list", help="the keys' ids, tenants and dates (no secrets)")
    lst.add_argument("--json", action="store_true", help="print a JSON list")
    lst.set_defaults(func=_keys_list)
    rev = ksub.add_parser("revoke", help="revoke a key by its id (servers refuse it from then on)")
    rev.add_argument("key_id", metavar="KEY_ID", help="the id `herd keys list` shows (the key's herd_<id>_ part)")
    rev.set_defaults(func=_keys_revoke)
    for p in (add, lst, rev):
        p.add_argument("--keys-file", metavar="FILE",
                       help="the key store (default: the running herd up cluster's, else $HERD_HOME/keys.json)")


def _keys_file(args: argparse.Namespace) -> Path:
    from cluster.keys import default_keys_file
    from cluster.launcher import State

    if args.keys_file:
        return Path(args.keys_file)
    state = State.read()
    running = ((state.config or {}).get("auth") or {}).get("keys_file") if state else None
    return Path(running) if running else default_keys_file()


def _keys_add(args: argparse.Namespace) -> int:
    from deployments.auth import add_key

    path = _keys_file(args)
    key, record = add_key(path, args.tenant, admin=args.admin)
    print(f"key {record.id} for tenant {record.tenant}{' (admin)' if record.admin else ''} added to {path}; "
          "it is shown only now:", file=sys.stderr)
    print(key)
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    import json

    from cluster.keys import list_keys

    path = _keys_file(args)
    keys = list_keys(path)
    if args.json:
        print(json.dumps(keys, indent=2))
        return 0
    if not keys:
        print(f"no keys in {path}", file=sys.stderr)
    for k in keys:
        print(f"{k['id']}  {k['tenant']:20s} {'admin' if k['admin'] else 'tenant':6s} {k['created']}")
    return 0


def _keys_revoke(args: argparse.Namespace) -> int:
    from cluster.keys import revoke

    for line in revoke(_keys_file(args), args.key_id):
        print(line)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="herd",
        description="Herd: serve Llama 4-class MoE multimodal models on Ray.",
        epilog=EXIT_STATUS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and the traceback of an error as well as its message")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_synth(sub)
    _add_generate(sub)
    _add_plan(sub)
    _add_cluster_commands(sub)
    _add_keys(sub)
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
        print(f"\nherd {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # the CLI's last line of defence: expected errors are one line, bugs a traceback
        from model.errors import HerdModelError

        if isinstance(e, (CliError, HerdModelError, ValueError, OSError)):
            if args.verbose:
                traceback.print_exc()
            print(f"herd {args.command}: error: {e}", file=sys.stderr)
            return e.exit_code if isinstance(e, CliError) else EXIT_FAILED
        traceback.print_exc()
        print(f"herd {args.command}: internal error (a bug in herd): {type(e).__name__}: {e}; "
              "please report it with the traceback above", file=sys.stderr)
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
