"""SIGTERM on a real gateway: in-flight generations settle within the grace period, and those
cut off by it are released, never left held."""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

import httpx

from tests.money import produced_cost, quiet_usage


def _wait_in_flight(gateway: Any) -> None:
    deadline = time.monotonic() + 15
    while "falgate_inflight_requests 1.0" not in httpx.get(f"{gateway.url}/metrics").text:
        assert time.monotonic() < deadline, "the generation never started"
        time.sleep(0.02)


def _generate_in_background(gateway: Any, key: str) -> tuple[threading.Thread, dict[str, Any]]:
    result: dict[str, Any] = {}

    def call() -> None:
        try:
            with gateway.client(key) as client:
                result["status"] = client.post("/v1/generate", json={"prompt": "x"}).status_code
        except httpx.HTTPError as exc:
            result["error"] = exc

    thread = threading.Thread(target=call)
    thread.start()
    return thread, result


def _usage(gateway: Any, key: str) -> dict[str, Any]:
    with gateway.client(key) as client:
        usage: dict[str, Any] = client.get("/v1/usage").json()
    return usage


def test_in_flight_generation_settles_before_exit(
    gateways: Any, gateway: Any, clean_sandbox: Any
) -> None:
    draining = gateways.start(FALGATE_SHUTDOWN_GRACE_S="20")
    _, key = draining.create_key(name="drain", budget_usd="1")
    clean_sandbox.configure(latency_ms=1500)
    thread, result = _generate_in_background(draining, key)
    _wait_in_flight(draining)

    draining.proc.send_signal(signal.SIGTERM)
    thread.join(timeout=30)
    # uvicorn re-raises the signal once it has shut down cleanly
    assert draining.proc.wait(timeout=30) in (0, -signal.SIGTERM)
    assert result.get("status") == 200
    assert "Application shutdown complete." in draining.output()

    usage = _usage(gateway, key)  # another gateway on the same Redis
    assert (usage["spent_usd"], usage["held_usd"], usage["in_flight"]) == (
        "0.011797",
        "0.000000",
        0,
    )


def test_generation_cut_off_by_the_grace_period_is_cancelled_and_resolved(
    gateways: Any, gateway: Any, clean_sandbox: Any
) -> None:
    hurried = gateways.start(FALGATE_SHUTDOWN_GRACE_S="1")
    _, key = hurried.create_key(name="cut-off", budget_usd="1")
    clean_sandbox.configure(latency_ms=10_000)
    thread, result = _generate_in_background(hurried, key)
    _wait_in_flight(hurried)

    hurried.proc.send_signal(signal.SIGTERM)
    hurried.proc.wait(timeout=30)
    thread.join(timeout=30)
    assert result.get("status") != 200

    # fal had accepted the job: the gateway told fal to cancel it on the way out, and the
    # hold is resolved from fal's answer (by another process), not released on a guess.
    with gateway.client(key) as client:
        usage = quiet_usage(client)
    produced = produced_cost(clean_sandbox.requests())
    assert produced == 0  # cancelled before it drew anything
    assert (usage["spent_usd"], usage["remaining_usd"]) == ("0.000000", "1.000000")
