"""The cluster on a real local Ray: HTTP and gRPC outputs equal the offline engine token for token
(text, image and token-id prompts), streaming on both, sharded experts equal colocated ones;
GET /health and /version; the `herd` CLI's errors, --prompt-file and piped chat against it."""

import io
import json

import grpc
import httpx
import pytest
from PIL import Image

from deployments.engine.engine import Engine
from deployments.engine.inputs import image_digest, prepare_prompt
from deployments.engine.params import SamplingParams
from deployments.pb import herd_pb2 as pb
from deployments.pb import herd_pb2_grpc
from model.chat import encode_chat

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def png(width: int, height: int, seed: int) -> bytes:
    img = Image.effect_noise((width, height), 30 + seed).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def offline(checkpoint):
    return Engine.from_pretrained(checkpoint)


def offline_chat(engine, text: str, images: list[bytes]) -> list[int]:
    from model.image import decode_image

    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    ids = encode_chat(engine.tokenizer, [{"role": "user", "content": content}])
    ids, inputs = prepare_prompt(engine.model, engine.tokenizer, ids, [decode_image(b) for b in images],
                                 [image_digest(b) for b in images])
    return engine.generate([ids], GREEDY, images=[inputs])[0].token_ids


def grpc_stub(served):
    return herd_pb2_grpc.HerdStub(grpc.insecure_channel(served.grpc))


def grpc_sampling() -> pb.SamplingParams:
    return pb.SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def colocated(served):
    served.deploy()
    return served


def test_grpc_streaming_equals_offline(colocated, offline):
    ids = [offline.tokenizer.bos_id] + offline.tokenizer.encode("Hello there, herd!")
    want = offline.generate([ids], GREEDY)[0]
    request = pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=ids), sampling=grpc_sampling())
    chunks = list(grpc_stub(colocated).Generate(request, timeout=60))
    assert len(chunks) > 1  # streamed, not one blob
    assert [t for c in chunks for t in c.token_ids] == want.token_ids
    assert "".join(c.text for c in chunks) == want.text
    assert chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == 12


def test_http_chat_with_images_equals_offline(colocated, offline):
    images = [png(150, 60, 1), png(40, 70, 2)]
    want = offline_chat(offline, "What is in these pictures?", images)
    import base64

    content = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b).decode()}}
               for b in images] + [{"type": "text", "text": "What is in these pictures?"}]
    body = {"model": colocated.model_dir.name, "messages": [{"role": "user", "content": content}],
            "max_tokens": 12, "temperature": 0, "ignore_eos": True, "logprobs": False}
    r = httpx.post(f"{colocated.http}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    text = r.json()["choices"][0]["message"]["content"]
    assert text == offline.tokenizer.decode(want, skip_special_tokens=True)
    assert r.json()["usage"]["completion_tokens"] == 12


def test_http_completion_stream_with_token_ids(colocated, offline):
    ids = [offline.tokenizer.bos_id, 300, 301, 302, 303]
    want = offline.generate([ids], GREEDY)[0]
    body = {"model": colocated.model_dir.name, "prompt": ids, "max_tokens": 12, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{colocated.http}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert len(chunks) > 1
    assert "".join(c["choices"][0]["text"] for c in chunks) == want.text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_official_openai_client(colocated, offline):
    from openai import OpenAI

    client = OpenAI(base_url=f"{colocated.http}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == [colocated.model_dir.name]
    messages = [{"role": "user", "content": "Say something."}]
    want = offline.tokenizer.decode(offline_chat(offline, "Say something.", []), skip_special_tokens=True)
    done = client.chat.completions.create(model=colocated.model_dir.name, messages=messages, max_tokens=12,
                                          temperature=0, extra_body={"ignore_eos": True})
    assert done.choices[0].message.content == want and done.usage.completion_tokens == 12
    stream = client.chat.completions.create(model=colocated.model_dir.name, messages=messages, max_tokens=12,
                                            temperature=0, stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == 12


def test_grpc_health_and_models(colocated):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = grpc.insecure_channel(colocated.grpc)
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    models = grpc_stub(colocated).ListModels(pb.ListModelsRequest(), timeout=30)
    assert [m.id for m in models.models] == [colocated.model_dir.name] and models.models[0].multimodal
    assert (models.models[0].weights_precision, models.models[0].experts_precision) == ("fp32", "fp32")  # CPU


def test_grpc_reflection_lists_the_herd_service(colocated):
    """grpcurl/grpcui work without the .proto file (Serve's proxy serves reflection)."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(grpc.insecure_channel(colocated.grpc))
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30)
    names = {s.name for r in replies for s in r.list_services_response.service}
    assert {"herd.v1.Herd", "grpc.health.v1.Health"} <= names


def test_grpc_unary_equals_streaming(colocated):
    req = pb.GenerateRequest(text="One two three", sampling=grpc_sampling())
    unary = grpc_stub(colocated).GenerateUnary(req, timeout=60)
    streamed = list(grpc_stub(colocated).Generate(req, timeout=60))
    assert list(unary.token_ids) == [t for c in streamed for t in c.token_ids]
    assert unary.text == "".join(c.text for c in streamed) and unary.usage.completion_tokens == 12


def test_http_health_and_version(colocated):
    """What guidellm and vLLM's benchmark clients call before their first request."""
    import importlib.metadata

    r = httpx.get(f"{colocated.http}/health", timeout=30)
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    r = httpx.get(f"{colocated.http}/version", timeout=30)
    assert r.status_code == 200
    assert r.json() == {"version": importlib.metadata.version("herd"), "model": colocated.model_dir.name}


# ---- the `herd` CLI against the cluster (without one: tests/cluster/test_cli.py) ---------------

def herd(*args: str, stdin: bytes | None = None) -> tuple[int, str, str]:
    """`herd ARGS` in a subprocess: exit status, stdout and stderr (bytes decoded as they are: a
    model's "\r" must not turn into a line break here)."""
    import subprocess
    import sys
    from pathlib import Path

    out = subprocess.run([sys.executable, "-m", "cluster.cli", *args], input=stdin, capture_output=True,
                         timeout=120, cwd=Path(__file__).resolve().parents[2])
    return out.returncode, out.stdout.decode(), out.stderr.decode()


def test_cli_wrong_model_is_one_line_without_traceback(colocated):
    code, stdout, stderr = herd("generate", "--address", colocated.grpc, "--model", "llama4", "--prompt", "hi")
    assert code == 1 and stdout == ""
    assert stderr.strip().splitlines() == [
        f"herd generate: error: model 'llama4' is not served here; this cluster serves {colocated.model_dir.name!r}"]


def test_cli_prompt_file_and_stdin_equal_prompt(colocated, tmp_path):
    text = "A prompt for a file:\nits second line."
    args = ["generate", "--address", colocated.grpc, "--max-tokens", "8"]
    code, stdout, stderr = herd(*args, "--json", "--prompt", text)
    assert code == 0, stderr
    want = json.loads(stdout)
    assert len(want["token_ids"]) == 8
    (tmp_path / "prompt.txt").write_text(text + "\n")
    assert json.loads(herd(*args, "--json", "--prompt-file", str(tmp_path / "prompt.txt"))[1]) == want
    assert json.loads(herd(*args, "--json", "--prompt-file", "-", stdin=text.encode())[1]) == want
    assert herd(*args, "--prompt-file", "-", stdin=text.encode())[1] == want["text"] + "\n"  # streamed text


def test_cli_chat_with_piped_stdin_prints_a_transcript(colocated):
    code, stdout, stderr = herd("chat", "--address", colocated.grpc, "--max-tokens", "6", "--temperature", "0",
                                stdin=b"Hello herd\n\nAnd then?\n")
    assert code == 0 and "Traceback" not in stderr, stderr
    assert stdout.endswith("\n")
    lines = stdout[:-1].split("\n")
    assert all(line.startswith(("you> ", "herd> ")) for line in lines), lines
    assert [line for line in lines if line.startswith("you> ")] == ["you> Hello herd", "you> And then?"]
    assert lines[0] == "you> Hello herd" and lines[1].startswith("herd> ")
    assert lines[-1].startswith("herd> ")


def test_metrics_show_requests_and_expert_load(colocated):
    """After the requests above: Ray's Prometheus endpoint has the router service's counters, including
    the tokens routed to each expert (load imbalance)."""
    assert colocated.metric("ray_herd_requests_total", 'status="ok"') > 0
    assert colocated.metric("ray_herd_expert_routed_tokens_total") > 0
