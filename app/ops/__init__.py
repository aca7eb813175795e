"""Operations: metrics, JSON logs and request ids, health routes, graceful shutdown, and Redis
clients for every deployment shape.

Wiring, in ``create_app(settings)``::

    install_ops(app, settings)        # after the other middlewares, so it is the outermost

and in the lifespan::

    token = bind_metrics(app.state.metrics)   # before starting background tasks
    ...
    await app.state.inflight.drain(settings.shutdown_grace_s)   # on shutdown, before closing
"""

from __future__ import annotations

from fastapi import FastAPI

from app.ops.health import router as health_router
from app.ops.logging import (
    RequestContextMiddleware,
    configure_logging,
    logging_config,
    uvicorn_options,
)
from app.ops.metrics import (
    HoldsSnapshot,
    Metrics,
    bind_metrics,
    metrics_of,
    observe_upstream,
    record_redis_error,
    record_settled,
)
from app.ops.redis_topology import redis_from_url
from app.ops.shutdown import InflightTracker
from app.settings import Settings

__all__ = [
    "HoldsSnapshot",
    "InflightTracker",
    "Metrics",
    "RequestContextMiddleware",
    "bind_metrics",
    "configure_logging",
    "health_router",
    "install_ops",
    "logging_config",
    "metrics_of",
    "observe_upstream",
    "record_redis_error",
    "record_settled",
    "redis_from_url",
    "uvicorn_options",
]


def install_ops(app: FastAPI, settings: Settings) -> None:
    """Give ``app`` its metrics, in-flight tracker, request-context middleware and the
    ``/healthz``, ``/readyz`` and ``/metrics`` routes.

    Sets ``app.state.metrics`` and ``app.state.inflight``. Call it after adding the other
    middlewares: the middleware added last is the outermost, and this one must see every
    response.
    """
    metrics = metrics_of(app)
    app.state.inflight = InflightTracker()
    app.add_middleware(RequestContextMiddleware, settings=settings, metrics=metrics)
    app.include_router(health_router)
