"""The Ingress deployment: gRPC (`herd.v1.Herd`) and OpenAI-style HTTP in front of the cluster.

It validates requests, renders the Llama 4 chat format, tokenizes, sends images to the
VisionEncoder, expands the image tokens, and streams a router-service replica's output back. Every failure
becomes a status code with a readable message (deployments/errors.py); nothing it receives can
crash a replica.

Besides the OpenAI routes, HTTP has what clients and benchmarks (guidellm, vLLM's own scripts) probe
first, as vLLM serves them: `GET /health` (200 when a router-service replica answers, 503 with an
OpenAI-style error body otherwise) and `GET /version` (herd's package version and the served model).
"""


import asyncio
import hashlib
import importlib.metadata
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from grpc_health.v1 import health_pb2
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments import openai_api as oai
from deployments.config import HerdConfig
from deployments.engine.output import RequestOutput
from deployments.engine.sequence import ImageInput
from deployments.errors import ModelNotFound, classify
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


def _set_grpc_error(grpc_context, error: Exception) -> None:
    err = classify(error)
    log.info("gRPC request failed: %s %s", err.grpc_code.name, err.message)
    grpc_context.set_code(err.grpc_code)
    grpc_context.set_details(err.message)


def _http_error(error: Exception) -> JSONResponse:
    err = classify(error)
    log.info("HTTP request failed: %d %s", err.http_status, err.message)
    return JSONResponse(oai.error_body(err.message, err.type, err.http_status), status_code=err.http_status)


@serve.deployment
@serve.ingress(app)
class Ingress:
    health_timeout_s = 5.0  # `GET /health` answers 503 when no router-service replica answers within this

    def __init__(self, config: dict, router_service: DeploymentHandle, vision: DeploymentHandle):
        route_to_serve_logs()
        self.cfg = HerdConfig.model_validate(config)
        self.model_cfg = Llama4Config.from_dir(self.cfg.model)
        self.precision = self.cfg.served_precision()
        self.tokenizer = Tokenizer.from_dir(self.cfg.model)
        self.router_service = router_service
        self.vision = vision

    # ---- the request path shared by both APIs ------------------------------------------------
    async def stream(self, req: GenerationRequest) -> AsyncIterator[RequestOutput]:
        if req.model and req.model != self.cfg.model_name:
            raise ModelNotFound(f"model {req.model!r} is not served here; this cluster serves {self.cfg.model_name!r}")
        ids, images = await self._prompt(req)
        # The engine's key for the request is made here, never taken from the client: `request_id`
        # (a gRPC client may choose it) is only a label echoed back in every output. Clients that
        # number their requests "1", "2", ... would otherwise collide with each other on a replica.
        engine_id = f"herd-{uuid.uuid4().hex}"
        response = self.router_service.options(stream=True).generate.remote(
            engine_id, ids, req.params, images, req.tenant, req.session_id)
        try:
            async for delta in response:
                yield replace(delta, request_id=req.request_id)
        finally:
            response.cancel()  # a client that left cancels its request (no-op when finished)

    async def _prompt(self, req: GenerationRequest) -> tuple[list[int], list[ImageInput]]:
        if req.prompt_token_ids is not None:
            return list(req.prompt_token_ids), []
        if req.text is not None:
            if not req.text:
                raise InvalidInputError("the prompt is empty")
            return self.tokenizer.encode(req.text, add_bos=True, allow_special=False), []
        if not req.messages:
            raise InvalidInputError("messages must be a non-empty list")
        images = [p.data for turn in req.messages for p in turn.parts if isinstance(p, ImagePart)]
        if len(images) > self.cfg.limits.max_images_per_request:
            raise ImageError(f"too many images: {len(images)} > {self.cfg.limits.max_images_per_request}")
        messages = [{"role": t.role, "content": [{"type": "image"} if isinstance(p, ImagePart)
                                                 else {"type": "text", "text": p} for p in t.parts]}
                    for t in req.messages]
        ids = encode_chat(self.tokenizer, messages)
        return await self._with_images(ids, images)

    async def _with_images(self, ids: list[int], images: list[bytes]) -> tuple[list[int], list[ImageInput]]:
        if not images:
            return ids, []
        if self.model_cfg.vision is None:
            raise InvalidInputError("this model takes no images")
        digests = [hashlib.sha256(data).hexdigest() for data in images]
        results = await asyncio.gather(*[self.vision.embed.remote(d, data)
                                         for d, data in zip(digests, images, strict=True)])
        per_tile = self.model_cfg.vision.tokens_per_tile
        ids = expand_image_tokens(ids, [ratio for ratio, _ in results], per_tile, self.tokenizer.image_ids)
        return ids, [ImageInput(embeds, d) for (_, embeds), d in zip(results, digests, strict=True)]

    # ---- gRPC --------------------------------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest, grpc_context):  # noqa: N802 (gRPC method name)
        try:
            async for delta in self.stream(request_from_pb(request)):
                yield response_from_output(delta)
        except Exception as e:  # every failure becomes a status code
            _set_grpc_error(grpc_context, e)
            raise

    async def GenerateUnary(self, request: pb.GenerateRequest, grpc_context) -> pb.GenerateResponse:  # noqa: N802
        try:
            return response_from_output(join_outputs([d async for d in self.stream(request_from_pb(request))]))
        except Exception as e:
            _set_grpc_error(grpc_context, e)
            raise

    async def ListModels(self, request: pb.ListModelsRequest) -> pb.ListModelsResponse:  # noqa: N802
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
    @app.get("/v1/models")
    async def models(self) -> dict:
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
            body = oai.decode_body(await self._body(request), self.cfg.limits.max_body_bytes)
            parsed = oai.parse_chat_request(body) if chat else oai.parse_completion_request(body)
            if isinstance(parsed, oai.CompletionRequest) and isinstance(parsed.prompt, list):
                oai.check_prompt_token_ids(parsed.prompt, self.model_cfg.text.vocab_size)
            req = oai.to_generation_request(parsed, request_id=request_id,
                                            tenant_header=request.headers.get("x-herd-tenant"))
            if parsed.stream:
                first = await self._first(req)
                return StreamingResponse(self._sse(req, first, chat, parsed), media_type="text/event-stream")
            deltas = [d async for d in self.stream(req)]
        except Exception as e:  # a 4xx/5xx with a message, never a crash
            return _http_error(e)
        build = oai.chat_completion if chat else oai.completion
        return JSONResponse(build(request_id, self.cfg.model_name, deltas))

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
            err = classify(e)
            yield oai.sse(oai.error_body(err.message, err.type, err.http_status))
        finally:
            await stream.aclose()
        yield oai.SSE_DONE
