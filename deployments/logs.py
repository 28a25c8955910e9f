"""Herd's own log lines inside Serve replicas and Ray actors: the `deployments` and `model` loggers
write at INFO through Serve's handlers (the replica's log file, the Ray dashboard's log view)
instead of being dropped by the root logger's WARNING level."""

from __future__ import annotations

import logging

HERD_LOGGERS = ("deployments", "model", "cluster")


def route_to_serve_logs(level: int = logging.INFO) -> None:
    handlers = logging.getLogger("ray.serve").handlers
    for name in HERD_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if handlers:
            logger.handlers = list(handlers)
            logger.propagate = False
