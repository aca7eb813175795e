"""The money invariant every failure test ends with (SPEC sections 4, 5 and 10).

Σ settled on the key's ledger = Σ over the requests the sandbox completed of the exact pixels
it produced * the unit price, rounded up once per request; nothing held, nothing in flight.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import httpx

FLUX_DEV_MICRO_PER_MP = 15_000


def cost_of(pixels: int, unit_price: int = FLUX_DEV_MICRO_PER_MP) -> int:
    """SPEC section 4: ceil(pixels * unit price / 10^6) micro-dollars."""
    return -(-pixels * unit_price // 1_000_000)


def produced_cost(
    sandbox_requests: Iterable[dict[str, Any]], unit_price: int = FLUX_DEV_MICRO_PER_MP
) -> int:
    """What fal (the sandbox) did and would bill: its completed requests, priced."""
    return sum(
        cost_of(int(r["pixels"]), unit_price)
        for r in sandbox_requests
        if r["status"] == "completed" and r["pixels"]
    )


def micro(usd: str) -> int:
    whole, _, frac = usd.partition(".")
    return int(whole) * 1_000_000 + int(frac.ljust(6, "0"))


def quiet_usage(client: httpx.Client, timeout_s: float = 25.0) -> dict[str, Any]:
    """``/v1/usage`` once nothing is held or in flight (bounded wait); fails otherwise."""
    deadline = time.monotonic() + timeout_s
    usage: dict[str, Any] = {}
    while time.monotonic() < deadline:
        usage = client.get("/v1/usage").json()
        if usage["held_usd"] == "0.000000" and usage["in_flight"] == 0:
            return usage
        time.sleep(0.1)
    raise AssertionError(f"holds were never resolved: {usage}")
