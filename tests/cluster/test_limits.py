"""Work is bounded on a real cluster (HTTP and gRPC through Serve's proxies): oversized input is a
400 / INVALID_ARGUMENT naming the field, overload is refused with 429 / RESOURCE_EXHAUSTED while
accepted requests complete, and a request past its timeout gets 504 / DEADLINE_EXCEEDED and is
cancelled in the engine (its KV freed) while a request beside it finishes intact."""

import threading
import time

import grpc
import httpx
import pytest
from ray import serve

from deployments.pb import herd_pb2 as pb
from tests.cluster.grpc_client import Stream, stub

# One router-service replica that runs one sequence and queues one: 3 ongoing at most (so the
# engine's own refusal is reachable), 1 more waiting in the Ingress's handle, the rest refused.
OVERLOAD = dict(router_service={"num_replicas": 1, "max_ongoing_requests": 3, "max_queued_requests": 1},
                engine={"max_num_seqs": 1, "max_waiting": 1},
                limits={"max_prompt_chars": 5000, "max_body_bytes": 1 << 20})
TIMED = dict(limits={"request_timeout_s": 2.0})
VICTIM = pb.GenerateRequest(text="tell me a long story",
                            sampling=pb.SamplingParams(max_tokens=48, temperature=0, ignore_eos=True))


def tokens(responses) -> list[int]:
    return [t for r in responses for t in r.token_ids]


@pytest.fixture(scope="module")
def overload(served):
    served.deploy(**OVERLOAD)
    return served


@pytest.fixture(scope="module")
def victim_alone(overload):
    return tokens(stub(overload).Generate(VICTIM, timeout=60))


@pytest.mark.parametrize("body, field", [
    ({"prompt": "x" * 5001, "max_tokens": 2}, "prompt: 5001 characters"),
    ({"messages": [{"role": "user", "content": "y" * 3000}, {"role": "user", "content": "z" * 2001}]},
     "messages: 5001 characters"),
    ({"prompt": "hi", "stop": ["s" * 1025]}, "stop"),
    ({"prompt": list(range(3, 4100)), "max_tokens": 1}, "prompt: prompt of 4097 tokens is too long"),
])
def test_oversized_http_input_is_a_400_naming_the_field(overload, body, field):
    path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    r = httpx.post(overload.http + path, json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert field in r.json()["error"]["message"]


def test_a_grpc_message_above_max_body_bytes_is_invalid_argument(overload):
    with pytest.raises(grpc.RpcError) as info:
        list(stub(overload).Generate(pb.GenerateRequest(text="x" * (2 << 20)), timeout=60))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request: the message is" in info.value.details()


def test_overload_is_refused_at_once_and_accepted_requests_complete(overload, victim_alone):
    """Ten requests beside a running stream, on a replica that holds three: the excess gets 429 /
    RESOURCE_EXHAUSTED (from the Ingress at its share of the router service, or the engine's
    max_waiting), every accepted one completes, and the stream finishes with its solo tokens."""
    victim = Stream(overload, VICTIM)
    victim.start()
    assert victim.started.wait(60)
    results: dict[int, object] = {}

    def http(n):
        r = httpx.post(overload.http + "/v1/completions", timeout=120,
                       json={"prompt": f"request {n}", "max_tokens": 48, "temperature": 0, "ignore_eos": True})
        results[n] = (r.status_code, r.json())

    def rpc(n):
        try:
            results[n] = tokens(stub(overload).Generate(VICTIM, timeout=120))
        except grpc.RpcError as e:
            results[n] = e

    threads = [threading.Thread(target=http if n % 2 else rpc, args=(n,)) for n in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    victim.join(120)
    assert victim.error is None, victim.error.details()
    assert tokens(victim.responses) == victim_alone
    refused = 0
    for result in results.values():
        if isinstance(result, grpc.RpcError):
            assert result.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, result.details()
            refused += 1
        elif isinstance(result, list):
            assert result == victim_alone  # accepted: complete, the same tokens
        else:
            status, body = result
            if status == 429:
                assert body["error"]["type"] == "rate_limit_error", body
                refused += 1
            else:
                assert status == 200 and body["usage"]["completion_tokens"] == 48, body
    assert len(results) == 10 and refused >= 1


def router_stats(served) -> dict:
    return serve.get_deployment_handle("RouterService", app_name="herd").stats.remote().result()


def test_a_request_past_its_timeout_is_cancelled_and_its_kv_freed(overload):
    """request_timeout_s 2: a 4000-token request gets 504 (HTTP) / DEADLINE_EXCEEDED (gRPC), the
    engine drops it (no running or waiting sequence, no KV block in use), and a short stream beside
    it finishes intact."""
    overload.deploy(**TIMED)
    short = pb.GenerateRequest(text="a short one", sampling=pb.SamplingParams(max_tokens=8, temperature=0,
                                                                              ignore_eos=True))
    alone = tokens(stub(overload).Generate(short, timeout=60))
    long_body = {"prompt": "go on and on", "max_tokens": 4000, "temperature": 0, "ignore_eos": True}
    start = time.monotonic()
    r = httpx.post(overload.http + "/v1/completions", json=long_body, timeout=60)
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error", r.text
    assert "request_timeout_s" in r.json()["error"]["message"]
    with httpx.stream("POST", overload.http + "/v1/completions", json=long_body | {"stream": True}, timeout=60) as s:
        events = [line for line in s.iter_lines() if line.startswith("data: ")]
    assert '"code":504' in events[-2] and events[-1] == "data: [DONE]"  # a started stream ends with an error event
    long_request = pb.GenerateRequest(text="go on", sampling=pb.SamplingParams(max_tokens=4000, ignore_eos=True))
    beside = Stream(overload, short)
    with pytest.raises(grpc.RpcError) as info:
        for n, _ in enumerate(stub(overload).Generate(long_request, timeout=60)):
            if n == 0:
                beside.start()
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, info.value.details()
    beside.join(60)
    assert beside.error is None and tokens(beside.responses) == alone
    assert time.monotonic() - start < 50  # bounded: none of them ran to 4000 tokens
    deadline = time.monotonic() + 20
    while True:
        stats = router_stats(overload)
        used = {k: v for k, v in stats.items() if k.endswith("_used")}
        if (stats["running"], stats["waiting"], sum(used.values())) == (0, 0, 0) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert stats["running"] == 0 and stats["waiting"] == 0 and not any(used.values()), stats
