"""Clients that hang up mid-request leave nothing held.

Found by the benchmark (wrk drops its connections at its deadline): a client going away while
the admission script was under way left that request's hold, and its in-flight slot, in place
for as long as the gateway process lived.
"""

from __future__ import annotations

import json
import random
import time

import httpx
import pytest

from tests.conftest import Gateway, GatewayFactory, Sandbox

BODY = {"prompt": "a hang-up", "image_size": {"width": 64, "height": 64}}


def test_clients_that_go_away_leave_nothing_held(gateway: Gateway, clean_sandbox: Sandbox) -> None:
    _, key = gateway.create_key(name="hang-ups", budget_usd="100")
    rng = random.Random(7)
    with gateway.client(key) as client:
        for _ in range(300):
            # Give up somewhere between before admission and after the answer.
            timeout = httpx.Timeout(rng.uniform(0.0005, 0.012))
            try:
                client.post("/v1/run/fal-ai/flux/dev", json=BODY, timeout=timeout)
            except httpx.TimeoutException:
                pass

        deadline = time.monotonic() + 15
        while True:
            usage = client.get("/v1/usage").json()
            if usage["held_usd"] == "0.000000" and usage["in_flight"] == 0:
                break
            assert time.monotonic() < deadline, f"still held after the clients left: {usage}"
            time.sleep(0.1)


def test_a_client_that_leaves_has_its_fal_job_cancelled_at_once(
    gateways: GatewayFactory, clean_sandbox: Sandbox
) -> None:
    """The edge tells the request its client left (no watcher task): the request ends with a
    499 although fal never answers and the gateway's own deadlines are 10 minutes away, and the
    hold is released, in sync and in queue mode. (Without the signal nothing would end it.)"""
    for mode in ("sync", "queue"):
        gateway = gateways.start(
            FALGATE_UPSTREAM_MODE=mode,
            FALGATE_UPSTREAM_REQUEST_TIMEOUT_S="600",
            FALGATE_UPSTREAM_READ_TIMEOUT_S="600",
        )
        try:
            clean_sandbox.reset()
            _, key = gateway.create_key(name=f"leaves-{mode}", budget_usd="10")
            clean_sandbox.configure(faults=[{"kind": "hang", "scope": "any"}])
            with gateway.client(key) as client, pytest.raises(httpx.ReadTimeout):
                client.post("/v1/run/fal-ai/flux/dev", json=BODY, timeout=0.5)
            deadline = time.monotonic() + 30  # a wait for the line, not a speed check
            while time.monotonic() < deadline and " 499" not in gateway.output():
                time.sleep(0.05)
            lines = [json.loads(x) for x in gateway.output().splitlines() if '"status":499' in x]
            assert [line["route"] for line in lines] == ["/v1/run/{model_id}"], lines
            clean_sandbox.reset()
            with gateway.client(key) as client:
                usage = client.get("/v1/usage").json()
            assert (usage["held_usd"], usage["in_flight"]) == ("0.000000", 0), usage
        finally:
            gateway.stop()
