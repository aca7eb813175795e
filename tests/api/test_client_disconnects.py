"""Clients that hang up mid-request leave nothing held.

Found by the benchmark (wrk drops its connections at its deadline): a client going away while
the admission script was under way left that request's hold, and its in-flight slot, in place
for as long as the gateway process lived.
"""

from __future__ import annotations

import random
import time

import httpx

from tests.conftest import Gateway, Sandbox

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
