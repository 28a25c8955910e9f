"""`build_app`: the Serve application from a `HerdConfig` (the `import_path` of the Serve config:
`cluster.app:build_app`, its `args` a HerdConfig)."""

from __future__ import annotations

from ray.serve import Application

from deployments.config import DeploymentOptions, HerdConfig, RoutingConfig
from deployments.process_env import env_for_sharded
from deployments.routing.registry import request_router_class


def _options(opts: DeploymentOptions) -> dict:
    actor = {"num_cpus": opts.num_cpus}
    if opts.num_gpus:
        actor["num_gpus"] = opts.num_gpus
    from ray.serve.config import BackpressureConfig

    # A full Serve queue refuses at once: HTTP 429 (Serve's default is 503) / gRPC RESOURCE_EXHAUSTED.
    return {"num_replicas": opts.num_replicas, "max_ongoing_requests": opts.max_ongoing_requests,
            "max_queued_requests": opts.max_queued_requests,
            "backpressure_config": BackpressureConfig(status_code=429, retry_after_s=1), "ray_actor_options": actor}


def _request_router(routing: RoutingConfig) -> dict:
    """The router service's request router, from the policy registry (deployments/routing/registry.py);
    nothing for Serve's default."""
    router_class = request_router_class(routing.policy)
    if router_class is None:
        return {}
    from ray.serve.config import RequestRouterConfig

    return {"request_router_config": RequestRouterConfig(
        request_router_class=router_class, request_router_kwargs=routing.model_dump(exclude={"policy"}))}


def build_app(args: dict | HerdConfig) -> Application:
    from deployments.ingress import Ingress
    from deployments.router_service import RouterService
    from deployments.vision import VisionEncoder

    cfg = args if isinstance(args, HerdConfig) else HerdConfig.model_validate(args)
    config = cfg.model_dump()
    # The Ingress (the router service's only caller) enforces router_service.max_queued_requests
    # itself, before preparing the prompt (deployments/ingress.py router_capacity_share). Serve's own
    # check, which refuses later (after that work: 0.1-0.5 s measured), is kept as a backstop with
    # twice the room, so that its accounting of finished requests, which lags the Ingress's, does not
    # refuse what the Ingress admitted.
    router_options = _options(cfg.router_service)
    if cfg.experts.mode == "sharded":  # replicas that wait on shards sharing their nodes' cores
        router_options["ray_actor_options"]["runtime_env"] = {"env_vars": env_for_sharded()}
    if cfg.router_service.max_queued_requests > 0:
        router_options["max_queued_requests"] = 2 * cfg.router_service.max_queued_requests
    router = RouterService.options(**router_options, **_request_router(cfg.routing)).bind(config)
    vision = VisionEncoder.options(**_options(cfg.vision)).bind(config)
    return Ingress.options(**_options(cfg.ingress)).bind(config, router, vision)
