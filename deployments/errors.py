"""One mapping from what went wrong to what the client sees: gRPC status + HTTP status + message.

A client sees the messages Herd writes for it (bad input, not found, overloaded, timed out,
unavailable); an unexpected exception becomes a generic "internal error" naming the request id and
an incident id, never its text (which may hold paths, addresses or secrets): `classify` logs the
exception with its traceback under both ids."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

import grpc
import ray
from ray.serve.exceptions import BackPressureError

from deployments.auth import AuthError, TenantForbidden
from deployments.engine.async_engine import EngineStepError
from deployments.engine.engine import EngineOverloaded
from deployments.expert_shard import ExpertsUnavailable
from deployments.openai_schema import BodyTooLarge
from model.errors import InvalidInputError

log = logging.getLogger(__name__)
MAX_SHOWN_CHARS = 300  # an unavailable part's message is cut to its first line, this long at most


class ModelNotFound(LookupError):
    """The request names a model this cluster does not serve."""


class AtCapacity(RuntimeError):
    """The router service cannot take another request from this Ingress replica now: refused before
    any work (no tokenizing, no image decoding) with HTTP 429 / RESOURCE_EXHAUSTED."""


class RequestTimeout(TimeoutError):
    """The request ran past `limits.request_timeout_s`, or its stream sent nothing for
    `limits.stream_idle_timeout_s` (gRPC DEADLINE_EXCEEDED, HTTP 504); it was cancelled in the engine."""


@dataclass(frozen=True)
class ClientError:
    grpc_code: grpc.StatusCode
    http_status: int
    type: str
    message: str


def _cause(error: BaseException) -> BaseException:
    """The user-level exception inside Ray's wrappers."""
    while isinstance(error, ray.exceptions.RayTaskError) and getattr(error, "cause", None) is not None:
        error = error.cause
    return error


def classify(error: BaseException, request_id: str = "") -> ClientError:
    err = _cause(error)
    message = str(err).strip() or type(err).__name__
    if isinstance(err, AuthError):
        return ClientError(grpc.StatusCode.UNAUTHENTICATED, 401, "authentication_error", message)
    if isinstance(err, TenantForbidden):
        return ClientError(grpc.StatusCode.PERMISSION_DENIED, 403, "permission_error", message)
    if isinstance(err, BodyTooLarge):
        return ClientError(grpc.StatusCode.INVALID_ARGUMENT, 413, "invalid_request_error", message)
    if isinstance(err, InvalidInputError):
        return ClientError(grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error", message)
    if isinstance(err, ModelNotFound):
        return ClientError(grpc.StatusCode.NOT_FOUND, 404, "not_found_error", message)
    if isinstance(err, (EngineOverloaded, AtCapacity)):
        return ClientError(grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error", message)
    if isinstance(err, BackPressureError):  # a Serve queue (max_queued_requests) is full
        return ClientError(grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error",
                           f"the cluster is at capacity, retry later ({err.message})")
    if isinstance(err, RequestTimeout):
        return ClientError(grpc.StatusCode.DEADLINE_EXCEEDED, 504, "timeout_error", message)
    unavailable = (EngineStepError, ExpertsUnavailable, ray.exceptions.RayActorError,
                   ray.exceptions.ActorUnavailableError)
    if isinstance(err, unavailable) or "unavailable" in message.lower():
        shown = (message.splitlines() or [""])[0][:MAX_SHOWN_CHARS]
        return ClientError(grpc.StatusCode.UNAVAILABLE, 503, "service_unavailable",
                           f"a part of the cluster is unavailable, retry: {shown}")
    incident = uuid.uuid4().hex[:12]
    about = f"request {request_id}, " if request_id else ""
    log.error("internal error, %sincident %s: %s: %s", about, incident, type(err).__name__, message, exc_info=err)
    return ClientError(grpc.StatusCode.INTERNAL, 500, "internal_error",
                       f"internal error ({about}incident {incident}: the server's log has the details)")


def log_failure(error: BaseException, err: ClientError, request_id: str, api: str) -> None:
    """Log a failed request's status and message (an internal error was logged, with its
    traceback, by `classify`)."""
    if err.grpc_code != grpc.StatusCode.INTERNAL:
        log.info("%s request %s failed: %s %s", api, request_id, err.grpc_code.name, err.message)
