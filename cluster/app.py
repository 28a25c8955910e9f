"""`build_app`: the Serve application from a `HerdConfig` (the `import_path` of the Serve config:
`cluster.app:build_app`, its `args` a HerdConfig)."""

from __future__ import annotations

from ray.serve import Application

from cluster.config import DeploymentOptions, HerdConfig


def _options(opts: DeploymentOptions) -> dict:
    actor = {"num_cpus": opts.num_cpus}
    if opts.num_gpus:
        actor["num_gpus"] = opts.num_gpus
    return {"num_replicas": opts.num_replicas, "max_ongoing_requests": opts.max_ongoing_requests,
            "ray_actor_options": actor}


def build_app(args: dict | HerdConfig) -> Application:
    from deployments.ingress import Ingress
    from deployments.router import Router
    from deployments.vision import VisionEncoder

    cfg = args if isinstance(args, HerdConfig) else HerdConfig.model_validate(args)
    config = cfg.model_dump()
    router = Router.options(**_options(cfg.router)).bind(config)
    vision = VisionEncoder.options(**_options(cfg.vision)).bind(config)
    return Ingress.options(**_options(cfg.ingress)).bind(config, router, vision)
