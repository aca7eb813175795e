"""``/healthz``, ``/readyz`` against a real Redis, and what ``/metrics`` reports."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI, Request

from app.errors import BudgetExceeded, RateLimited, add_exception_handlers
from app.ops.install import install_ops
from app.ops.metrics import HoldsSnapshot, observe_upstream, record_redis_error, record_settled
from app.ops.redis_topology import redis_from_url
from app.settings import Settings


def _settings(**overrides: object) -> Settings:
    return Settings(_env_file=None, **overrides)  # type: ignore[arg-type]


def _app(settings: Settings, redis_url: str | None) -> FastAPI:
    app = FastAPI()
    app.state.settings = settings
    app.state.redis = redis_from_url(redis_url, settings) if redis_url else None
    add_exception_handlers(app)
    install_ops(app, settings)

    @app.post("/v1/run/{model_id:path}")
    async def run(model_id: str, request: Request) -> dict[str, str]:
        request.state.model = model_id
        body = await request.json()
        outcome = body.get("outcome", "ok")
        if outcome == "broke":
            raise BudgetExceeded("Not enough budget.")
        if outcome == "limited":
            raise RateLimited("Slow down.", headers={"Retry-After": "1"})
        observe_upstream("fal-ai/flux/dev", "ok", 1.7)
        record_settled(model_id, 11797)
        return {"status": "done"}

    @app.get("/v1/flaky-redis")
    async def flaky() -> dict[str, str]:
        record_redis_error("admit")
        return {"status": "degraded"}

    return app


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[httpx.AsyncClient]:
    app = _app(_settings(sandbox_url="http://127.0.0.1:9"), redis_url)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gw"
    ) as http:
        yield http
    await app.state.redis.aclose()


def _sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus text ``text``."""
    for line in text.splitlines():
        match = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if found == labels:
            return float(match.group(3))
    raise AssertionError(f"no sample {name}{labels}")


async def test_healthz_says_ok(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert response.headers["x-request-id"].startswith("req_")


async def test_readyz_is_ready_with_redis_and_an_upstream(client: httpx.AsyncClient) -> None:
    response = await client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "checks": {"redis": "ok", "upstream": "ok"}}


async def test_readyz_is_503_in_the_error_envelope_when_redis_is_down() -> None:
    app = _app(_settings(fal_key="fal-test"), "redis://127.0.0.1:1/0")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
        response = await http.get("/readyz", headers={"X-Request-Id": "probe-1"})
        metrics = (await http.get("/metrics")).text
    await app.state.redis.aclose()
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["type"] == "unavailable"
    assert error["request_id"] == response.headers["X-Request-Id"]
    assert response.headers["X-Client-Request-Id"] == "probe-1"
    assert error["checks"] == {"redis": "failed", "upstream": "ok"}
    assert _sample(metrics, "falgate_redis_errors_total", operation="readyz") == 1


async def test_readyz_needs_an_upstream() -> None:
    app = _app(_settings(), None)  # sandbox mode, no sandbox started: nothing to forward to
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
        response = await http.get("/readyz")
    assert response.status_code == 503
    assert response.json()["error"]["checks"] == {"redis": "failed", "upstream": "failed"}


async def test_metrics_count_requests_spend_and_rejections(client: httpx.AsyncClient) -> None:
    for outcome in ("ok", "ok", "broke", "limited"):
        await client.post("/v1/run/fal-ai/flux/dev", json={"outcome": outcome})
    await client.get("/v1/no-such-route")
    await client.get("/v1/flaky-redis")

    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    route = "/v1/run/{model_id}"
    model = "fal-ai/flux/dev"
    for status, count in (("200", 2), ("402", 1), ("429", 1)):
        labels = {"route": route, "method": "POST", "status": status, "model": model}
        assert _sample(text, "falgate_http_requests_total", **labels) == count
    assert (
        _sample(
            text,
            "falgate_http_requests_total",
            route="<unmatched>",
            method="GET",
            status="404",
            model="",
        )
        == 1
    )
    assert _sample(text, "falgate_budget_rejections_total", model=model) == 1
    assert _sample(text, "falgate_rate_limited_total", model=model) == 1
    assert _sample(text, "falgate_settled_micro_usd_total", model=model) == 2 * 11797
    assert (
        _sample(
            text, "falgate_upstream_request_duration_seconds_count", endpoint=model, outcome="ok"
        )
        == 2
    )
    assert _sample(text, "falgate_redis_errors_total", operation="admit") == 1
    assert _sample(text, "falgate_inflight_requests") == 0


async def test_holds_outstanding_come_from_the_metering_source(redis_url: str) -> None:
    app = _app(_settings(sandbox_url="http://127.0.0.1:9"), redis_url)

    async def holds() -> HoldsSnapshot:
        return HoldsSnapshot(count=3, micro=35391)

    app.state.metrics.set_holds_source(holds)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
        text = (await http.get("/metrics")).text
    await app.state.redis.aclose()
    assert _sample(text, "falgate_holds_outstanding") == 3
    assert _sample(text, "falgate_holds_outstanding_micro_usd") == 35391


async def test_two_apps_in_one_process_keep_their_own_metrics(redis_url: str) -> None:
    apps = [_app(_settings(sandbox_url="http://127.0.0.1:9"), redis_url) for _ in range(2)]
    texts = []
    for n, app in enumerate(apps):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
            for _ in range(n + 1):
                await http.post("/v1/run/flux-dev", json={})
            texts.append((await http.get("/metrics")).text)
        await app.state.redis.aclose()
    labels = {"route": "/v1/run/{model_id}", "method": "POST", "status": "200", "model": "flux-dev"}
    assert [_sample(t, "falgate_http_requests_total", **labels) for t in texts] == [1, 2]


def test_operations_routes_are_documented() -> None:
    schema = _app(_settings(), None).openapi()
    ops = {
        path: method["operationId"]
        for path, item in schema["paths"].items()
        for method in item.values()
    }
    assert ops["/healthz"] == "getHealth"
    assert ops["/readyz"] == "getReadiness"
    assert ops["/metrics"] == "getMetrics"
    assert "503" in schema["paths"]["/readyz"]["get"]["responses"]
