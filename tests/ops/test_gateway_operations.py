"""The real gateway process: ops routes, its JSON access log and metrics after a generation,
and the whole request path on a Redis Cluster."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
from redis_topologies import RedisTopology

ADMIN_TOKEN = "test-admin-token-0123456789abcdef"  # tests/conftest.py's


def _json_lines(output: str) -> list[dict[str, Any]]:
    lines = []
    for line in output.splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


def _access_line(gateway: Any, request_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 5
    while True:  # the line is written as the response completes; give the log a moment
        found = [
            line
            for line in _json_lines(gateway.output())
            if line["logger"] == "falgate.access" and line.get("request_id") == request_id
        ]
        if found or time.monotonic() > deadline:
            assert len(found) == 1, found
            return found[0]
        time.sleep(0.05)


def test_ops_routes(gateway: Any) -> None:
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"] == {"redis": "ok", "upstream": "ok"}
        metrics = client.get("/metrics")
        assert metrics.status_code == 200
        assert "falgate_http_requests_total" in metrics.text


def test_generation_is_logged_once_and_counted(gateway: Any) -> None:
    key_id, key = gateway.create_key(name="ops-logging")
    request_id = f"ops-e2e-{time.monotonic_ns()}"
    with gateway.client(key) as client:
        response = client.post(
            "/v1/generate",
            json={"prompt": "a lighthouse at dusk"},
            headers={"X-Request-Id": request_id},
        )
    assert response.status_code == 200, response.text
    assert response.headers["x-client-request-id"] == request_id
    assert response.headers["x-request-id"].startswith("req_")

    line = _access_line(gateway, response.headers["x-request-id"])
    assert line["client_request_id"] == request_id
    assert line["route"] == "/v1/generate" and line["status"] == 200
    assert line["key_id"] == key_id
    assert line["model"] == "fal-ai/flux/dev"
    assert line["cost_usd"] == response.headers["x-cost-usd"]
    assert line["upstream_request_id"]
    assert "prompt" not in line  # FALGATE_LOG_PROMPTS is off by default

    json_text = "\n".join(json.dumps(entry) for entry in _json_lines(gateway.output()))
    assert key not in json_text and ADMIN_TOKEN not in json_text
    assert key not in gateway.output()  # nor anywhere else on stdout/stderr

    metrics = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    assert (
        'falgate_http_requests_total{method="POST",model="fal-ai/flux/dev",'
        'route="/v1/generate",status="200"}'
    ) in metrics
    assert 'falgate_settled_micro_usd_total{model="fal-ai/flux/dev"}' in metrics
    assert (
        'falgate_upstream_request_duration_seconds_count{endpoint="fal-ai/flux/dev",outcome="ok"}'
    ) in metrics


def test_the_gateway_runs_on_a_redis_cluster(gateways: Any, redis_cluster: RedisTopology) -> None:
    gateway = gateways.start(FALGATE_REDIS_URL=redis_cluster.url)
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        assert client.get("/readyz").status_code == 200
    _, key = gateway.create_key(name="on-cluster", budget_usd="0.03", budget_period="total")
    with gateway.client(key) as client:
        statuses = [
            client.post("/v1/generate", json={"prompt": f"tile {i}"}).status_code for i in range(3)
        ]
        usage = client.get("/v1/usage").json()
    # 0.011797 per image: two fit in 0.03, the third is refused for lack of budget.
    assert statuses == [200, 200, 402]
    assert usage["spent_usd"] == "0.023594"
    assert usage["held_usd"] == "0.000000"
    gateway.stop()
