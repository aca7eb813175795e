"""One call that gives an app every operations feature (used by tests and small apps)."""

from __future__ import annotations

from fastapi import FastAPI

from app.ops.health import router as health_router
from app.ops.logging import RequestContextMiddleware
from app.ops.metrics import metrics_of
from app.ops.shutdown import InflightTracker
from app.settings import Settings

__all__ = ["install_ops"]


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
