"""Prometheus metrics, on a registry of the app's own (several apps can share one process).

Every metric is named ``falgate_*``:

=========================================  =========  ========================================
metric                                     type       labels
=========================================  =========  ========================================
``falgate_http_requests_total``            counter    ``route`` (template), ``method``,
                                                      ``status``, ``model``
``falgate_http_request_duration_seconds``  histogram  ``route``, ``method``
``falgate_upstream_request_duration_se…``  histogram  ``endpoint``, ``outcome``
``falgate_settled_micro_usd_total``        counter    ``model``
``falgate_key_settled_micro_usd_total``    counter    ``key`` (key id; only with
                                                      ``FALGATE_METRICS_KEY_LABEL=true``)
``falgate_holds_outstanding``              gauge      - (all processes; a snapshot in Redis
                                                      kept by the ledger drainer)
``falgate_holds_outstanding_micro_usd``    gauge      - (idem)
``falgate_inflight_requests``              gauge      - (this process's metered requests)
``falgate_budget_rejections_total``        counter    ``model`` (402s)
``falgate_rate_limited_total``             counter    ``model`` (429s)
``falgate_redis_errors_total``             counter    ``operation``
``falgate_edge_closed_connections_total``  counter    ``reason`` (header_timeout, evicted,
                                                      over_capacity; see app/ops/edge.py)
=========================================  =========  ========================================

The app owns one :class:`Metrics` (``app.state.metrics``, see :func:`metrics_of`). Code that has
no handle on it (the upstream client, the meter, the sweeper) calls the module-level helpers -
:func:`observe_upstream`, :func:`record_settled`, :func:`record_redis_error` - which act on the
*bound* instance: the request-context middleware binds it for each request, and the lifespan
binds it with :func:`bind_metrics` before starting background tasks (tasks inherit the binding).
With nothing bound the helpers do nothing, so unit tests need no set-up.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from contextvars import ContextVar, Token
from dataclasses import dataclass

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from starlette.applications import Starlette
from starlette.responses import Response

log = logging.getLogger("falgate.metrics")

# Generation takes seconds, so the buckets reach further than prometheus-client's defaults.
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
_MAX_LABEL = 100


@dataclass(frozen=True)
class HoldsSnapshot:
    """Holds not yet settled or released, across every gateway process."""

    count: int
    micro: int


HoldsSource = Callable[[], Awaitable[HoldsSnapshot]]


def _label(value: object) -> str:
    return str(value)[:_MAX_LABEL] if value is not None else ""


class Metrics:
    """The gateway's metrics and the registry they are exposed from."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "falgate_http_requests",
            "HTTP requests answered, by route template, method, status and model.",
            ["route", "method", "status", "model"],
            registry=r,
        )
        self.request_duration = Histogram(
            "falgate_http_request_duration_seconds",
            "Time from request start to the end of the response.",
            ["route", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_duration = Histogram(
            "falgate_upstream_request_duration_seconds",
            "Time spent on one call to fal (submit to result), by endpoint and outcome.",
            ["endpoint", "outcome"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.settled = Counter(
            "falgate_settled_micro_usd",
            "Micro-dollars settled (charged) by model.",
            ["model"],
            registry=r,
        )
        # Spend by key is opt-in (``FALGATE_METRICS_KEY_LABEL``): one series per key.
        self.key_label = False
        self.key_settled = Counter(
            "falgate_key_settled_micro_usd",
            "Micro-dollars settled (charged) by key id (opt-in: FALGATE_METRICS_KEY_LABEL).",
            ["key"],
            registry=r,
        )
        self.holds_outstanding = Gauge(
            "falgate_holds_outstanding",
            "Holds placed and not yet settled or released, across all processes.",
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.holds_outstanding_micro = Gauge(
            "falgate_holds_outstanding_micro_usd",
            "Micro-dollars held by outstanding holds, across all processes.",
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.inflight = Gauge(
            "falgate_inflight_requests",
            "Metered requests in flight (summed over the live worker processes).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.budget_rejections = Counter(
            "falgate_budget_rejections",
            "Requests refused with 402 for lack of budget.",
            ["model"],
            registry=r,
        )
        self.rate_limited = Counter(
            "falgate_rate_limited",
            "Requests refused with 429.",
            ["model"],
            registry=r,
        )
        self.redis_errors = Counter(
            "falgate_redis_errors",
            "Redis commands that failed (connection, timeout, cluster errors).",
            ["operation"],
            registry=r,
        )
        self.holds_reinstated = Counter(
            "falgate_holds_reinstated",
            "Holds the resolver released as abandoned that their live request put back because "
            "fal had the job (each may take settled + held past the key's budget).",
            registry=r,
        )
        self.edge_closed = Counter(
            "falgate_edge_closed_connections",
            "Connections the HTTP edge closed: head too slow, evicted or refused at the cap.",
            ["reason"],
            registry=r,
        )
        self._holds_source: HoldsSource | None = None

    # --- recorded by the request-context middleware -------------------------
    def observe_request(
        self, *, route: str, method: str, status: int, model: str | None, seconds: float
    ) -> None:
        model_label = _label(model)
        self.requests.labels(_label(route), method, str(status), model_label).inc()
        self.request_duration.labels(_label(route), method).observe(seconds)
        if status == 402:
            self.budget_rejections.labels(model_label).inc()
        elif status == 429:
            self.rate_limited.labels(model_label).inc()

    # --- recorded by the other layers ---------------------------------------
    def observe_upstream(self, endpoint: str, outcome: str, seconds: float) -> None:
        self.upstream_duration.labels(_label(endpoint), _label(outcome)).observe(seconds)

    def record_settled(self, model: str, micro: int, key_id: str | None = None) -> None:
        if micro > 0:
            self.settled.labels(_label(model)).inc(micro)
            if self.key_label and key_id:
                self.key_settled.labels(_label(key_id)).inc(micro)

    def record_redis_error(self, operation: str = "") -> None:
        self.redis_errors.labels(_label(operation)).inc()

    def record_edge_close(self, reason: str) -> None:
        self.edge_closed.labels(_label(reason)).inc()

    def record_reinstated(self) -> None:
        self.holds_reinstated.inc()

    def set_holds_source(self, source: HoldsSource | None) -> None:
        """Register how to count the outstanding holds; it is awaited on each scrape."""
        self._holds_source = source

    @property
    def has_holds_source(self) -> bool:
        return self._holds_source is not None

    async def refresh_holds(self, timeout_s: float = 1.0) -> None:
        """Update the holds gauges from the source; on failure keep the last values."""
        if self._holds_source is None:
            return
        try:
            snapshot = await asyncio.wait_for(self._holds_source(), timeout_s)
        except Exception:  # a scrape must never fail because Redis is down
            log.warning("could not count outstanding holds", exc_info=True)
            self.record_redis_error("holds_scrape")
            return
        self.holds_outstanding.set(snapshot.count)
        self.holds_outstanding_micro.set(snapshot.micro)

    def render(self) -> bytes:
        directory = multiprocess_dir()
        if directory is None:
            return generate_latest(self.registry)
        # Several worker processes (``falgate serve --workers N``): every process writes its
        # samples to files in the directory; a scrape of any worker adds them all up.
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged, path=directory)  # type: ignore[no-untyped-call]
        return generate_latest(merged)


def multiprocess_dir() -> str | None:
    """prometheus_client's multiprocess directory, set for the workers of ``--workers N``."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def mark_process_dead() -> None:
    """A worker is stopping: its live gauges (in-flight requests) no longer count."""
    if multiprocess_dir() is not None:
        multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]


async def metrics_response(metrics: Metrics, *, holds_timeout_s: float = 1.0) -> Response:
    """The body of ``GET /metrics`` in Prometheus' text format."""
    await metrics.refresh_holds(holds_timeout_s)
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)


def metrics_of(app: Starlette) -> Metrics:
    """The app's :class:`Metrics` (``app.state.metrics``), created on first use."""
    metrics: Metrics | None = getattr(app.state, "metrics", None)
    if metrics is None:
        metrics = Metrics()
        app.state.metrics = metrics
    return metrics


# --- the bound instance, for code without a handle on the app ---------------
_bound: ContextVar[Metrics | None] = ContextVar("falgate_metrics", default=None)


def bind_metrics(metrics: Metrics | None) -> Token[Metrics | None]:
    """Make ``metrics`` the target of the module-level helpers in this context (and tasks
    started from it). Returns a token for :func:`unbind_metrics`."""
    return _bound.set(metrics)


def unbind_metrics(token: Token[Metrics | None]) -> None:
    _bound.reset(token)


def current_metrics() -> Metrics | None:
    return _bound.get()


def observe_upstream(endpoint: str, outcome: str, seconds: float) -> None:
    """One call to fal finished. ``outcome``: ``ok``, ``invalid``, ``error``, ``timeout``,
    ``unavailable``, ``cancelled`` (keep it to a small fixed set)."""
    metrics = _bound.get()
    if metrics is not None:
        metrics.observe_upstream(endpoint, outcome, seconds)


def record_settled(model: str, micro: int, key_id: str | None = None) -> None:
    """A hold was settled for ``micro`` micro-dollars on ``model`` (a catalog id)."""
    metrics = _bound.get()
    if metrics is not None:
        metrics.record_settled(model, micro, key_id)


def record_reinstated() -> None:
    """A hold released as abandoned was put back by its live request (``reinstate.lua``)."""
    metrics = _bound.get()
    if metrics is not None:
        metrics.record_reinstated()


def record_redis_error(operation: str = "") -> None:
    """A Redis command failed; ``operation`` is a short fixed name (``admit``, ``settle``)."""
    metrics = _bound.get()
    if metrics is not None:
        metrics.record_redis_error(operation)
