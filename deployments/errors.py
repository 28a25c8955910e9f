"""One mapping from what went wrong to what the client sees: gRPC status + HTTP status + message."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import ray

from deployments.auth import AuthError, TenantForbidden
from deployments.engine.async_engine import EngineStepError
from deployments.engine.engine import EngineOverloaded
from deployments.expert_shard import ExpertsUnavailable
from deployments.openai_schema import BodyTooLarge
from model.errors import InvalidInputError


class ModelNotFound(LookupError):
    """The request names a model this cluster does not serve."""


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


def classify(error: BaseException) -> ClientError:
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
    if isinstance(err, EngineOverloaded):
        return ClientError(grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error", message)
    unavailable = (EngineStepError, ExpertsUnavailable, ray.exceptions.RayActorError,
                   ray.exceptions.ActorUnavailableError)
    if isinstance(err, unavailable) or "unavailable" in message.lower():
        return ClientError(grpc.StatusCode.UNAVAILABLE, 503, "service_unavailable",
                           f"a part of the cluster is unavailable, retry: {message}")
    return ClientError(grpc.StatusCode.INTERNAL, 500, "internal_error", f"internal error: {message}")
