"""`build_app`: the Serve application from a `HerdConfig` (the `import_path` of the Serve config:
`cluster.app:build_app`, its `args` a HerdConfig)."""

from __future__ import annotations

from ray.serve import Application

from deployments.config import DeploymentOptions, HerdConfig, RoutingConfig


def _options(opts: DeploymentOptions) -> dict:
    actor = {"num_cpus": opts.num_cpus}
    if opts.num_gpus:
        actor["num_gpus"] = opts.num_gpus
    return {"num_replicas": opts.num_replicas, "max_ongoing_requests": opts.max_ongoing_requests,
            "ray_actor_options": actor}


def _request_router(routing: RoutingConfig) -> dict:
    """The Router deployment's request router: prefix affinity (deployments/prefix_router.py) or,
    for `power_of_two`, Serve's default."""
    if routing.policy != "prefix_affinity":
        return {}
    from ray.serve.config import RequestRouterConfig

    from deployments.prefix_router import PrefixAffinityRouter

    return {"request_router_config": RequestRouterConfig(
        request_router_class=PrefixAffinityRouter, request_router_kwargs=routing.model_dump(exclude={"policy"}))}


def build_app(args: dict | HerdConfig) -> Application:
    from deployments.ingress import Ingress
    from deployments.router import Router
    from deployments.vision import VisionEncoder

    cfg = args if isinstance(args, HerdConfig) else HerdConfig.model_validate(args)
    config = cfg.model_dump()
    router = Router.options(**_options(cfg.router), **_request_router(cfg.routing)).bind(config)
    vision = VisionEncoder.options(**_options(cfg.vision)).bind(config)
    return Ingress.options(**_options(cfg.ingress)).bind(config, router, vision)
