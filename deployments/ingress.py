"""The Ingress deployment: gRPC (`herd.v1.Herd`) and OpenAI-style HTTP in front of the cluster.

It validates requests, renders the Llama 4 chat format, tokenizes, sends images to the
VisionEncoder, expands the image tokens, and streams a router-service replica's output back. Every failure
becomes a status code with a readable message (deployments/errors.py); nothing it receives can
crash a replica.

Besides the OpenAI routes, HTTP has what clients and benchmarks (guidellm, vLLM's own scripts) probe
first, as vLLM serves them: `GET /health` (200 when a router-service replica answers, 503 with an
OpenAI-style error body otherwise) and `GET /version` (herd's package version and the served model).

Work is bounded before it is done (`limits.*`): the body's bytes while it is read, then the prompt's
characters, the images' count and bytes, and token-id prompts' length against max_model_len, all
before anything costly; decoding the body (JSON, base64 images), chat templating, tokenizing and
hashing images then run on a small thread pool (`limits.prep_threads`), never on the event loop that
streams every other client's tokens. A request is cancelled in the engine (its KV freed) and
answered with 504 / DEADLINE_EXCEEDED once it runs past `limits.request_timeout_s` or sends nothing
for `limits.stream_idle_timeout_s`. Overload is refused at once with 429 / RESOURCE_EXHAUSTED by
Serve's queues (`max_queued_requests`) or the engine (`engine.max_waiting`).

Every other route and RPC needs an API key when `auth` is on (`Authorization: Bearer <key>`, on gRPC
as `authorization` metadata): 401 / UNAUTHENTICATED without a valid one, before the body is read.
The key decides the request's tenant, hence its prefix-cache namespace (deployments/auth.py).
"""


import asyncio
import contextlib
import functools
import hashlib
import importlib.metadata
import logging
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from grpc_health.v1 import health_pb2
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments import openai_api as oai
from deployments.auth import Authenticator, Principal
from deployments.config import HerdConfig
from deployments.engine.output import RequestOutput
from deployments.engine.sequence import ImageInput
from deployments.errors import AtCapacity, ModelNotFound, RequestTimeout, classify, log_failure
from deployments.grpc_api import join_outputs, request_from_pb, response_from_output
from deployments.logs import route_to_serve_logs
from deployments.pb import herd_pb2 as pb
from deployments.request import GenerationRequest, ImagePart
from model.chat import encode_chat
from model.config import Llama4Config
from model.errors import ImageError, InvalidInputError
from model.prompt import expand_image_tokens
from model.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def _herd_version() -> str:
    try:
        return importlib.metadata.version("herd")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never pip-installed
        return "unknown"


HERD_VERSION = _herd_version()

app = FastAPI(title="Herd", description="Llama 4 serving: OpenAI-compatible API")


def _set_grpc_error(grpc_context, error: Exception, request_id: str) -> None:
    err = classify(error, request_id)
    log_failure(error, err, request_id, "gRPC")
    grpc_context.set_code(err.grpc_code)
    grpc_context.set_details(err.message)


def _http_error(error: Exception, request_id: str) -> JSONResponse:
    err = classify(error, request_id)
    log_failure(error, err, request_id, "HTTP")
    headers = {"WWW-Authenticate": "Bearer"} if err.http_status == 401 else None
    return JSONResponse(oai.error_body(err.message, err.type, err.http_status), status_code=err.http_status,
                        headers=headers)


def check_prompt_chars(num_chars: int, limit: int, field: str) -> None:
    """InvalidInputError naming `field` if the prompt text is longer than `limits.max_prompt_chars`."""
    if num_chars > limit:
        raise InvalidInputError(f"{field}: {num_chars} characters of prompt text; at most {limit} are accepted "
                                "(limits.max_prompt_chars)")


def check_prompt_tokens(num_tokens: int, max_model_len: int, field: str) -> None:
    """InvalidInputError naming `field` if a prompt leaves no room to generate within max_model_len."""
    if num_tokens >= max_model_len:
        raise InvalidInputError(f"{field}: prompt of {num_tokens} tokens is too long: this model takes at most "
                                f"{max_model_len - 1} prompt tokens (max_model_len {max_model_len})")


END_OF_STREAM_WAIT_S = 1.0  # after a request's last output, how long its router stream may take to end


def router_capacity_share(cfg: HerdConfig) -> int | None:
    """Requests one Ingress replica may have in the router service at once: its share of the
    replicas' `max_ongoing_requests` plus its own handle's `max_queued_requests` (None: no queue
    limit). Beyond it the Ingress refuses before preparing the prompt; Serve's handle would refuse
    the same request only after that work (its BackPressureError stays the backstop)."""
    rs = cfg.router_service
    if rs.max_queued_requests < 0:
        return None
    return -(-rs.num_replicas * rs.max_ongoing_requests // cfg.ingress.num_replicas) + rs.max_queued_requests


@serve.deployment
@serve.ingress(app)
class Ingress:
    health_timeout_s = 5.0  # `GET /health` answers 503 when no router-service replica answers within this

    def __init__(self, config: dict, router_service: DeploymentHandle, vision: DeploymentHandle):
        route_to_serve_logs()
        self.cfg = HerdConfig.model_validate(config)
        self.auth = Authenticator.from_config(self.cfg.auth)
        self.model_cfg = Llama4Config.from_dir(self.cfg.model)
        self.precision = self.cfg.served_precision()
        self.tokenizer = Tokenizer.from_dir(self.cfg.model)
        self.router_service = router_service
        self.vision = vision
        self.limits = self.cfg.limits
        # The engine may cap it lower (KV capacity) and checks again; this bound needs no engine.
        self.max_model_len = self.cfg.engine.max_model_len or self.model_cfg.text.max_position_embeddings
        self._prep = ThreadPoolExecutor(max_workers=self.limits.prep_threads, thread_name_prefix="herd-prep")
        self.max_in_flight = router_capacity_share(self.cfg)
        self.in_flight = 0  # requests of this replica past the door: preparing, queued or running

    async def _off_loop(self, fn, *args, **kwargs):
        """Run `fn` on the prep threads: costly work never blocks the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._prep, functools.partial(fn, *args, **kwargs))

    # ---- the request path shared by both APIs ------------------------------------------------
    async def stream(self, req: GenerationRequest) -> AsyncIterator[RequestOutput]:
        if req.model and req.model != self.cfg.model_name:
            raise ModelNotFound(f"model {req.model!r} is not served here; this cluster serves {self.cfg.model_name!r}")
        if self.max_in_flight is not None and self.in_flight >= self.max_in_flight:
            raise AtCapacity(f"the cluster is at capacity ({self.in_flight} requests of this Ingress replica are "
                             "running or queued in the router service), retry later")
        self.in_flight += 1
        try:
            async with contextlib.aclosing(self._stream(req)) as deltas:  # closed at once when the caller leaves
                async for delta in deltas:
                    yield delta
        finally:
            self.in_flight -= 1

    async def _stream(self, req: GenerationRequest) -> AsyncIterator[RequestOutput]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.request_timeout_s
        try:
            ids, images = await asyncio.wait_for(self._prompt(req), self.limits.request_timeout_s)
        except TimeoutError:
            raise self._timeout(req, "preparing its prompt") from None
        # The engine's key for the request is made here, never taken from the client: `request_id`
        # (a gRPC client may choose it) is only a label echoed back in every output. Clients that
        # number their requests "1", "2", ... would otherwise collide with each other on a replica.
        engine_id = f"herd-{uuid.uuid4().hex}"
        response = self.router_service.options(stream=True).generate.remote(
            engine_id, ids, req.params, images, req.tenant, req.session_id)
        try:
            while True:
                wait = min(self.limits.stream_idle_timeout_s, deadline - loop.time())
                try:
                    delta = await asyncio.wait_for(response.__anext__(), max(wait, 0))
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    raise self._timeout(req, "waiting for its next output") from None
                yield replace(delta, request_id=req.request_id)
                if delta.finished:
                    # read the router's stream to its end (it ends right after), so that Serve frees the
                    # replica's slot now rather than after a cancel: the early refusal counts the same slots
                    with contextlib.suppress(StopAsyncIteration, TimeoutError):
                        await asyncio.wait_for(response.__anext__(), END_OF_STREAM_WAIT_S)
                    break
        finally:
            response.cancel()  # a client that left, or a timeout, cancels its request (no-op when finished)

    def _timeout(self, req: GenerationRequest, doing: str) -> RequestTimeout:
        limits = self.limits
        log.info("request %s timed out %s (limits: request %g s, idle %g s); cancelled", req.request_id, doing,
                 limits.request_timeout_s, limits.stream_idle_timeout_s)
        return RequestTimeout(f"the request timed out {doing} (limits.request_timeout_s {limits.request_timeout_s:g} "
                              f"s, limits.stream_idle_timeout_s {limits.stream_idle_timeout_s:g} s) and was cancelled")

    async def _prompt(self, req: GenerationRequest) -> tuple[list[int], list[ImageInput]]:
        """Token ids and image inputs: cheap size checks first, then the costly work off the loop."""
        if req.prompt_token_ids is not None:
            check_prompt_tokens(len(req.prompt_token_ids), self.max_model_len, "prompt")
            return list(req.prompt_token_ids), []
        if req.text is not None:
            if not req.text:
                raise InvalidInputError("the prompt is empty")
            check_prompt_chars(len(req.text), self.limits.max_prompt_chars, "prompt")
            ids = await self._off_loop(self.tokenizer.encode, req.text, add_bos=True, allow_special=False)
            check_prompt_tokens(len(ids), self.max_model_len, "prompt")
            return ids, []
        if not req.messages:
            raise InvalidInputError("messages must be a non-empty list")
        images = [p.data for turn in req.messages for p in turn.parts if isinstance(p, ImagePart)]
        if len(images) > self.limits.max_images_per_request:
            raise ImageError(f"messages: too many images: {len(images)} > {self.limits.max_images_per_request} "
                             "(limits.max_images_per_request)")
        for n, data in enumerate(images):
            if len(data) > self.limits.max_image_bytes:
                raise ImageError(f"messages: image {n} is too large: {len(data)} bytes > "
                                 f"{self.limits.max_image_bytes} (limits.max_image_bytes)")
        num_chars = sum(len(p) for turn in req.messages for p in turn.parts if isinstance(p, str))
        check_prompt_chars(num_chars, self.limits.max_prompt_chars, "messages")
        messages = [{"role": t.role, "content": [{"type": "image"} if isinstance(p, ImagePart)
                                                 else {"type": "text", "text": p} for p in t.parts]}
                    for t in req.messages]
        ids = await self._off_loop(encode_chat, self.tokenizer, messages)
        check_prompt_tokens(len(ids), self.max_model_len, "messages")
        return await self._with_images(ids, images)

    async def _with_images(self, ids: list[int], images: list[bytes]) -> tuple[list[int], list[ImageInput]]:
        if not images:
            return ids, []
        if self.model_cfg.vision is None:
            raise InvalidInputError("this model takes no images")
        digests = await self._off_loop(lambda: [hashlib.sha256(data).hexdigest() for data in images])
        results = await asyncio.gather(*[self.vision.embed.remote(d, data)
                                         for d, data in zip(digests, images, strict=True)])
        per_tile = self.model_cfg.vision.tokens_per_tile
        ids = expand_image_tokens(ids, [ratio for ratio, _ in results], per_tile, self.tokenizer.image_ids)
        return ids, [ImageInput(embeds, d) for (_, embeds), d in zip(results, digests, strict=True)]

    def _check_message_size(self, request: pb.GenerateRequest) -> None:
        """A gRPC request larger than limits.max_body_bytes is refused before it is converted (Serve's
        proxy accepts messages up to RAY_SERVE_GRPC_MAX_MESSAGE_SIZE, 2 GiB unless `herd up` sets it)."""
        size = request.ByteSize()
        if size > self.limits.max_body_bytes:
            raise InvalidInputError(f"request: the message is {size} bytes; at most {self.limits.max_body_bytes} are "
                                    "accepted (limits.max_body_bytes)")

    # ---- gRPC --------------------------------------------------------------------------------
    def _grpc_principal(self, grpc_context) -> Principal | None:
        metadata = dict(grpc_context.invocation_metadata()) if grpc_context is not None else {}
        return self.auth.principal(metadata.get("authorization"), "metadata `authorization: Bearer <key>`")

    def _grpc_request(self, request: pb.GenerateRequest, grpc_context) -> GenerationRequest:
        principal = self._grpc_principal(grpc_context)  # before any work on the message
        self._check_message_size(request)
        req = request_from_pb(request)
        return replace(req, tenant=self.auth.cache_salt(principal, req.tenant, "tenant"))

    async def Generate(self, request: pb.GenerateRequest, grpc_context):  # noqa: N802 (gRPC method name)
        req = None
        try:
            req = self._grpc_request(request, grpc_context)
            async for delta in self.stream(req):
                yield response_from_output(delta)
        except Exception as e:  # every failure becomes a status code
            _set_grpc_error(grpc_context, e, req.request_id if req else request.request_id)
            raise

    async def GenerateUnary(self, request: pb.GenerateRequest, grpc_context) -> pb.GenerateResponse:  # noqa: N802
        req = None
        try:
            req = self._grpc_request(request, grpc_context)
            return response_from_output(join_outputs([d async for d in self.stream(req)]))
        except Exception as e:
            _set_grpc_error(grpc_context, e, req.request_id if req else request.request_id)
            raise

    async def ListModels(self, request: pb.ListModelsRequest, grpc_context=None) -> pb.ListModelsResponse:  # noqa: N802
        try:
            self._grpc_principal(grpc_context)
        except Exception as e:
            _set_grpc_error(grpc_context, e, "")
            raise
        info = pb.ModelInfo(id=self.cfg.model_name, max_model_len=self.model_cfg.text.max_position_embeddings,
                            multimodal=self.model_cfg.vision is not None,
                            weights_precision=self.precision["weights"], experts_precision=self.precision["experts"])
        return pb.ListModelsResponse(models=[info])

    async def Check(self, request) -> health_pb2.HealthCheckResponse:  # noqa: N802 (grpc.health.v1)
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    # ---- HTTP: health and version (vLLM's routes) --------------------------------------------
    @app.get("/health")
    async def health(self) -> JSONResponse:
        """200 when the app can serve: this replica runs and a router-service replica answers a cheap
        call (its engine counters; vLLM's /health likewise only asks whether the engine is alive).
        503 with an error body while none answers within health_timeout_s (starting, restarting, gone)."""
        response = self.router_service.stats.remote()

        async def answer():
            return await response

        try:
            await asyncio.wait_for(answer(), self.health_timeout_s)
        except Exception as e:  # TimeoutError, a dead replica, ...: not healthy, never a 500
            response.cancel()
            if isinstance(e, TimeoutError):
                message = f"no router service replica answered within {self.health_timeout_s:g} s"
            else:
                detail = (str(e).strip().splitlines() or [""])[0]
                message = f"the router service is unavailable: {type(e).__name__}: {detail}"
            log.info("GET /health: 503 %s", message)
            return JSONResponse(oai.error_body(message, "service_unavailable", 503), status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/version")
    async def version(self) -> dict:
        return {"version": HERD_VERSION, "model": self.cfg.model_name}

    # ---- OpenAI HTTP -------------------------------------------------------------------------
    def _http_principal(self, request: Request) -> Principal | None:
        return self.auth.principal(request.headers.get("authorization"), "the header `Authorization: Bearer <key>`")

    @app.get("/v1/models")
    async def models(self, request: Request):
        try:
            self._http_principal(request)
        except Exception as e:
            return _http_error(e, "")
        return oai.models_list([self.cfg.model_name], created=int(time.time()), precision=self.precision)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._http(request, chat=True)

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._http(request, chat=False)

    async def _body(self, request: Request) -> bytes:
        """The raw body, read no further than `limits.max_body_bytes` (BodyTooLarge beyond)."""
        limit = self.cfg.limits.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit():
            oai.check_body_size(int(declared), limit)
        parts, size = [], 0
        async for part in request.stream():
            size += len(part)
            oai.check_body_size(size, limit)
            parts.append(part)
        return b"".join(parts)

    async def _http(self, request: Request, chat: bool):
        request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        try:
            principal = self._http_principal(request)  # before any work on the body
            raw = await self._body(request)
            parsed = await self._off_loop(self._parse_body, raw, chat)
            req = oai.to_generation_request(parsed, request_id=request_id)
            req = replace(req, tenant=self.auth.cache_salt(principal, request.headers.get("x-herd-tenant") or "",
                                                           "x-herd-tenant", user=parsed.user or ""))
            if parsed.stream:
                first = await self._first(req)
                return StreamingResponse(self._sse(req, first, chat, parsed), media_type="text/event-stream")
            deltas = [d async for d in self.stream(req)]
        except Exception as e:  # a 4xx/5xx with a message, never a crash
            return _http_error(e, request_id)
        build = oai.chat_completion if chat else oai.completion
        return JSONResponse(build(request_id, self.cfg.model_name, deltas))

    def _parse_body(self, raw: bytes, chat: bool) -> oai.ChatCompletionRequest | oai.CompletionRequest:
        """JSON, schema (base64 images decoded) and token-id checks: on a prep thread."""
        body = oai.decode_body(raw, self.limits.max_body_bytes)
        parsed = oai.parse_chat_request(body) if chat else oai.parse_completion_request(body)
        if isinstance(parsed, oai.CompletionRequest) and isinstance(parsed.prompt, list):
            check_prompt_tokens(len(parsed.prompt), self.max_model_len, "prompt")
            oai.check_prompt_token_ids(parsed.prompt, self.model_cfg.text.vocab_size)
        return parsed

    async def _first(self, req: GenerationRequest):
        """Start the stream and wait for its first delta, so that bad input still gets a 4xx."""
        stream = self.stream(req)
        return stream, await stream.__anext__()

    async def _sse(self, req: GenerationRequest, first, chat: bool, parsed) -> AsyncIterator[bytes]:
        stream, delta = first
        created = int(time.time())
        chunk = oai.chat_chunk if chat else oai.completion_chunk
        try:
            is_first = True
            while True:
                yield oai.sse(chunk(req.request_id, self.cfg.model_name, delta, is_first, created))
                is_first = False
                if delta.finish_reason:
                    break
                delta = await stream.__anext__()
            if getattr(getattr(parsed, "stream_options", None), "include_usage", False):
                yield oai.sse(oai.usage_chunk(req.request_id, self.cfg.model_name, delta, created, chat))
        except Exception as e:  # the stream ends with an error event, not a hang
            err = classify(e, req.request_id)
            log_failure(e, err, req.request_id, "HTTP stream")
            yield oai.sse(oai.error_body(err.message, err.type, err.http_status))
        finally:
            await stream.aclose()
        yield oai.SSE_DONE
