"""A submitted fal queue job is billed even when the gateway that took it dies: the resolver
of another gateway settles it from fal's answer, and that gateway answers its status and
result (its output fetched from fal)."""

from __future__ import annotations

import json
import time

from tests.conftest import GatewayFactory, Sandbox
from tests.falapi.conftest import unit_price


def test_a_dead_gateways_queue_job_is_settled_and_served(
    gateways: GatewayFactory, clean_sandbox: Sandbox
) -> None:
    clean_sandbox.configure(latency_ms=1500)
    lease = {"FALGATE_HOLD_LEASE_S": "1", "FALGATE_SWEEPER_INTERVAL_S": "0.3"}
    doomed, survivor = gateways.start(**lease), gateways.start(**lease)
    key_id, key = survivor.create_key(name="recovery")
    with doomed.client(key) as client:
        submitted = client.post("/fal/queue/fal-ai/flux/dev", json={"prompt": "orphan"})
    assert submitted.status_code == 200, submitted.text
    rid = submitted.json()["request_id"]
    doomed.kill()

    with survivor.client(key) as client:
        path = f"/fal/queue/fal-ai/flux/requests/{rid}"
        for _ in range(300):
            status = client.get(path + "/status")
            if status.status_code == 200:
                break
            assert status.status_code == 202, status.text
            time.sleep(0.05)
        assert status.json()["status"] == "COMPLETED" and "error" not in status.json()
        result = client.get(path)
        with survivor.admin() as admin:
            ledger = admin.get("/admin/ledger", params={"key_id": key_id}).text.splitlines()
    assert result.status_code == 200, result.text
    (produced,) = clean_sandbox.requests()
    assert produced["status"] == "completed"
    assert result.json()["images"][0]["url"] == produced["images"][0]["url"]
    (settle,) = [e for e in map(json.loads, ledger) if e["event"] == "settle"]
    assert settle["request_id"] == rid
    assert settle["amount_micro"] == -(-produced["pixels"] * unit_price(settle) // 1_000_000)


def test_fals_queue_api_uses_fals_queue_in_sync_mode(
    gateways: GatewayFactory, clean_sandbox: Sandbox
) -> None:
    """``FALGATE_UPSTREAM_MODE=sync`` is about ``/v1``; fal's queue API is forwarded to
    fal's queue (so fal's id is known at once) and works as usual."""
    gateway = gateways.start(FALGATE_UPSTREAM_MODE="sync")
    key_id, key = gateway.create_key(name="sync-queue")
    with gateway.client(key) as client:
        submitted = client.post("/fal/queue/fal-ai/flux/schnell", json={"prompt": "x"})
        assert submitted.status_code == 200, submitted.text
        for _ in range(300):
            status = client.get(submitted.json()["status_url"].replace(gateway.url, ""))
            if status.status_code == 200:
                break
            time.sleep(0.05)
        result = client.get(submitted.json()["response_url"].replace(gateway.url, ""))
        with gateway.admin() as admin:
            ledger = admin.get("/admin/ledger", params={"key_id": key_id}).text.splitlines()
    assert status.status_code == 200 and status.json()["status"] == "COMPLETED"
    assert result.status_code == 200
    (produced,) = clean_sandbox.requests()
    assert produced["protocol"] == "queue"
    assert result.json()["images"][0]["url"] == produced["images"][0]["url"]
    (settle,) = [e for e in map(json.loads, ledger) if e["event"] == "settle"]
    assert settle["amount_micro"] == -(-produced["pixels"] * unit_price(settle) // 1_000_000)


def test_queue_urls_use_the_public_url(gateways: GatewayFactory, clean_sandbox: Sandbox) -> None:
    """Behind a TLS terminator the URLs handed out name where clients reach falgate."""
    gateway = gateways.start(FALGATE_PUBLIC_URL="https://falgate.example.com/")
    _, key = gateway.create_key(name="public-url")
    with gateway.client(key) as client:
        submitted = client.post("/fal/queue/fal-ai/flux/dev", json={"prompt": "x"}).json()
    base = "https://falgate.example.com/fal/queue/fal-ai/flux/requests/"
    assert submitted["status_url"] == f"{base}{submitted['request_id']}/status"
    assert submitted["response_url"] == f"{base}{submitted['request_id']}"
