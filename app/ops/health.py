"""Operations routes: ``GET /healthz``, ``GET /readyz`` and ``GET /metrics``.

They read what the lifespan put on ``app.state``: ``settings``, ``redis`` (the client),
``metrics`` (:class:`app.ops.metrics.Metrics`), ``inflight`` (:class:`InflightTracker`) and, to
know the upstream is configured, ``fal`` (the upstream client) or ``sandbox_url``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from app.errors import Unavailable, error_response
from app.ops.holds import holds_from_snapshot
from app.ops.metrics import metrics_of, metrics_response
from app.ops.shutdown import InflightTracker
from app.schemas import error_responses
from app.settings import Settings

log = logging.getLogger("falgate.health")

router = APIRouter(tags=["operations"])

CheckResult = Literal["ok", "failed"]


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready"] = "ready"
    checks: dict[str, CheckResult] = Field(examples=[{"redis": "ok", "upstream": "ok"}])


@router.get(
    "/healthz",
    operation_id="getHealth",
    response_model=Health,
    summary="Liveness: the process is up",
)
async def healthz() -> Health:
    return Health()


async def _redis_ok(request: Request, settings: Settings) -> bool:
    client: Any = getattr(request.app.state, "redis", None)
    if client is None:
        return False
    timeout = settings.redis_connect_timeout_s + settings.redis_socket_timeout_s
    try:
        return bool(await asyncio.wait_for(client.ping(), timeout))
    except Exception:  # any failure means not ready; the reason goes to the log
        log.warning("readiness: redis ping failed", exc_info=True)
        metrics_of(request.app).record_redis_error("readyz")
        return False


def _upstream_configured(request: Request, settings: Settings) -> bool:
    state = request.app.state
    if getattr(state, "fal", None) is not None or getattr(state, "upstream", None) is not None:
        return True
    if settings.sandbox_mode:
        return bool(settings.sandbox_url or getattr(state, "sandbox_url", None))
    return bool(settings.fal_queue_url and settings.fal_run_url)


@router.get(
    "/readyz",
    operation_id="getReadiness",
    response_model=Readiness,
    responses=error_responses(503),
    summary="Readiness: Redis answers and an upstream is configured",
)
async def readyz(request: Request) -> Readiness | JSONResponse:
    settings: Settings = request.app.state.settings
    checks: dict[str, CheckResult] = {
        "redis": "ok" if await _redis_ok(request, settings) else "failed",
        "upstream": "ok" if _upstream_configured(request, settings) else "failed",
    }
    failed = [name for name, result in checks.items() if result != "ok"]
    if failed:
        return error_response(
            request, Unavailable(f"Not ready: {', '.join(failed)}.", extra={"checks": checks})
        )
    return Readiness(checks=checks)


@router.get(
    "/metrics",
    operation_id="getMetrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format."}},
    summary="Prometheus metrics",
)
async def metrics(request: Request) -> Response:
    app_metrics = metrics_of(request.app)
    inflight: InflightTracker | None = getattr(request.app.state, "inflight", None)
    if inflight is not None:
        app_metrics.inflight.set(inflight.count)
    redis = getattr(request.app.state, "redis", None)
    settings: Settings = request.app.state.settings
    if not app_metrics.has_holds_source and redis is not None:
        # Fresh while a drainer publishes it each cycle (see app.ops.holds).
        max_age_s = max(3 * settings.ledger_drain_interval_s, 15.0)
        app_metrics.set_holds_source(lambda: holds_from_snapshot(redis, max_age_s))
    return await metrics_response(
        app_metrics,
        holds_timeout_s=settings.redis_connect_timeout_s + settings.redis_socket_timeout_s,
    )
