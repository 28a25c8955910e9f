"""The Ingress bounds work before doing it, without Ray (fake router service and tokenizer):
prompt size caps checked before tokenizing, tokenizing off the event loop, gRPC messages capped,
request and idle timeouts that cancel the request, and error messages that never echo an internal
exception's text. With a real cluster: tests/cluster/test_limits.py."""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from types import MethodType, SimpleNamespace

import grpc
import pytest
from ray.serve.exceptions import BackPressureError

from deployments import ingress
from deployments.config import HerdConfig
from deployments.engine.engine import EngineOverloaded
from deployments.engine.output import RequestOutput
from deployments.engine.params import SamplingParams
from deployments.errors import AtCapacity, RequestTimeout, classify
from deployments.pb import herd_pb2 as pb
from deployments.request import ChatTurn, GenerationRequest, ImagePart
from model.errors import InvalidInputError

PARAMS = SamplingParams(max_tokens=4)


class Response:
    """A streaming DeploymentResponseGenerator: `outputs` then, if `hang`, nothing ever again."""

    def __init__(self, outputs, hang):
        self.outputs, self.hang, self.cancelled = list(outputs), hang, False

    async def __anext__(self):
        if self.outputs:
            return self.outputs.pop(0)
        if self.hang:
            await asyncio.sleep(3600)
        raise StopAsyncIteration

    def cancel(self):
        self.cancelled = True


class RouterService:
    def __init__(self, outputs=(), hang=False):
        self.response = Response(outputs, hang)
        self.generate = self

    def options(self, stream):
        return self

    def remote(self, *args):
        return self.response


class Tokenizer:
    def __init__(self, wait_for: threading.Event | None = None):
        self.wait_for, self.calls = wait_for, 0

    def encode(self, text, add_bos, allow_special):
        self.calls += 1
        if self.wait_for is not None:
            assert self.wait_for.wait(5), "the event loop was blocked while the prompt was tokenized"
        return [1] + [5] * len(text.split())


METHODS = ("stream", "_stream", "_prompt", "_off_loop", "_timeout", "_with_images", "_check_message_size", "_grpc_request")


def replica(tokenizer=None, router=None, **limits) -> SimpleNamespace:
    """The Ingress's request path on a plain object (its ASGI wrapper class needs Serve)."""
    r = SimpleNamespace()
    for name in METHODS:
        setattr(r, name, MethodType(getattr(ingress.Ingress.func_or_class, name), r))
    r.cfg = HerdConfig.model_validate({"model": "/models/tiny", "limits": limits, "engine": {"max_model_len": 64}})
    r.limits = r.cfg.limits
    r.max_model_len = 64
    r.model_cfg = SimpleNamespace(vision=None, text=SimpleNamespace(vocab_size=1000))
    r.tokenizer = tokenizer or Tokenizer()
    r.router_service = router or RouterService([RequestOutput("x", [7], "a", finish_reason="length")])
    r._prep = ThreadPoolExecutor(max_workers=2)
    r.max_in_flight, r.in_flight = ingress.router_capacity_share(r.cfg), 0
    return r


def collect(r, req: GenerationRequest):
    async def run():
        return [d async for d in r.stream(req)]

    return asyncio.run(asyncio.wait_for(run(), 10))


def test_prompts_are_tokenized_off_the_event_loop():
    """While one prompt is tokenized, the event loop serves others: the fake tokenizer waits for a
    coroutine of that loop (tokenizing on the loop, as before, blocked it until the wait failed)."""
    loop_ran = threading.Event()
    r = replica(Tokenizer(wait_for=loop_ran))

    async def main():
        async def tick():
            loop_ran.set()

        ticker = asyncio.get_running_loop().create_task(tick())
        out = [d async for d in r.stream(GenerationRequest("1", PARAMS, text="hello there"))]
        await ticker
        return out

    assert asyncio.run(main())[-1].finish_reason == "length"


@pytest.mark.parametrize("req, field", [
    (GenerationRequest("1", PARAMS, text="x" * 101), "prompt: 101 characters"),
    (GenerationRequest("1", PARAMS, messages=[ChatTurn("user", ["x" * 60]), ChatTurn("user", ["y" * 41])]),
     "messages: 101 characters"),
    (GenerationRequest("1", PARAMS, prompt_token_ids=[1] * 64), "prompt: prompt of 64 tokens is too long"),
    (GenerationRequest("1", PARAMS, messages=[ChatTurn("user", [ImagePart(b"x" * 2000)])]),
     "messages: image 0 is too large: 2000 bytes"),
    (GenerationRequest("1", PARAMS, messages=[ChatTurn("user", [ImagePart(b"x")] * 3)]), "messages: too many images"),
])
def test_size_caps_are_checked_before_any_costly_work(req, field):
    r = replica(max_prompt_chars=100, max_image_bytes=1000, max_images_per_request=2)
    with pytest.raises(InvalidInputError, match=field):
        collect(r, req)
    assert r.tokenizer.calls == 0


def test_a_prompt_longer_than_max_model_len_in_tokens_is_refused_after_tokenizing():
    r = replica()
    with pytest.raises(InvalidInputError, match="prompt: prompt of 70 tokens is too long"):
        collect(r, GenerationRequest("1", PARAMS, text=" ".join(["w"] * 69)))


def test_grpc_messages_above_max_body_bytes_are_refused():
    r = replica(max_body_bytes=1000)
    r._check_message_size(pb.GenerateRequest(text="hi"))
    with pytest.raises(InvalidInputError, match="request: the message is .* bytes; at most 1000"):
        r._check_message_size(pb.GenerateRequest(text="x" * 1001))


@pytest.mark.parametrize("limits, outputs", [
    ({"stream_idle_timeout_s": 0.2}, 2),  # two outputs, then silence: the idle timeout
    ({"request_timeout_s": 0.3}, 0),  # nothing at all (still waiting for admission): the request timeout
])
def test_a_request_past_its_timeout_is_cancelled_and_gets_deadline_exceeded(limits, outputs):
    router = RouterService([RequestOutput("x", [7], "a")] * outputs, hang=True)
    r = replica(router=router, **limits)
    got = []

    async def run():
        async for d in r.stream(GenerationRequest("1", PARAMS, prompt_token_ids=[1, 2, 3])):
            got.append(d)

    with pytest.raises(RequestTimeout) as info:
        asyncio.run(asyncio.wait_for(run(), 10))
    assert len(got) == outputs and router.response.cancelled  # cancelled: the engine aborts it, freeing its KV
    err = classify(info.value)
    assert (err.grpc_code, err.http_status) == (grpc.StatusCode.DEADLINE_EXCEEDED, 504)
    assert "timed out" in err.message


def test_internal_errors_never_echo_the_exception_text():
    err = classify(RuntimeError("/srv/secret/path.py: token=abc123"), "chatcmpl-42")
    assert (err.grpc_code, err.http_status) == (grpc.StatusCode.INTERNAL, 500)
    assert "abc123" not in err.message and "secret" not in err.message and "chatcmpl-42" in err.message


def test_http_500_body_is_generic_and_the_detail_goes_to_the_log(caplog):
    response = ingress._http_error(KeyError("internal detail 1234"), "cmpl-7")
    body = response.body.decode()
    assert response.status_code == 500 and "internal detail" not in body and "cmpl-7" in body
    assert any("cmpl-7" in rec.getMessage() and rec.exc_info for rec in caplog.records)


@pytest.mark.parametrize("error", [BackPressureError(num_queued_requests=3, max_queued_requests=3),
                                   EngineOverloaded("128 requests are already waiting; retry later"),
                                   AtCapacity("the cluster is at capacity")])
def test_overload_is_429_resource_exhausted(error):
    err = classify(error)
    assert (err.grpc_code, err.http_status, err.type) == (grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error")


def test_router_capacity_share_splits_ongoing_over_ingress_replicas():
    cfg = HerdConfig.model_validate({"model": "/m", "router_service": {"num_replicas": 3, "max_ongoing_requests": 8,
                                                                      "max_queued_requests": 4},
                                     "engine": {"max_waiting": 4}, "ingress": {"num_replicas": 2}})
    assert ingress.router_capacity_share(cfg) == 12 + 4
    unlimited = cfg.model_copy(update={"router_service": cfg.router_service.model_copy(
        update={"max_queued_requests": -1})})
    assert ingress.router_capacity_share(unlimited) is None


def test_beyond_the_router_capacity_the_ingress_refuses_before_any_work():
    """At its share of the router service's capacity the Ingress answers 429 without tokenizing; a
    request leaving (its caller gone) frees its place at once and cancels its router call."""
    tokenizer, router = Tokenizer(), RouterService([RequestOutput("x", [7], "a")], hang=True)
    r = replica(tokenizer=tokenizer, router=router)
    r.max_in_flight = 1

    async def run():
        held = r.stream(GenerationRequest("1", PARAMS, text="hold the only place"))
        assert (await held.__anext__()).token_ids == [7]
        with pytest.raises(AtCapacity, match="at capacity"):
            async for _ in r.stream(GenerationRequest("2", PARAMS, text="one too many")):
                pass
        calls = tokenizer.calls
        await held.aclose()  # the client left
        return calls

    assert asyncio.run(asyncio.wait_for(run(), 10)) == 1  # only the first prompt was tokenized
    assert r.in_flight == 0 and router.response.cancelled
