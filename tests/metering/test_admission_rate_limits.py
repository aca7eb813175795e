"""Per-key rate limits inside the admission script: GCRA for rpm, in-flight for max_concurrent.

A controllable clock is handed to the meter so the GCRA arithmetic is checked exactly, without
sleeping or asserting on wall time.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from app.errors import BudgetExceeded, RateLimited
from app.metering import Meter
from app.settings import Settings


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def timed_meter(r: Any, settings: Settings, clock: Clock) -> Meter:
    return Meter(r, settings, "proc_test", clock=clock)


async def try_admit(meter: Meter, key_id: str, request_id: str, price: Any, amount: int = 1) -> Any:
    try:
        return await meter.admit(
            key_id=key_id,
            request_id=request_id,
            model="m",
            operation="generate",
            estimate=price(amount),
            endpoint="m",
        )
    except RateLimited as exc:
        return exc


async def burst(meter: Meter, key_id: str, prefix: str, n: int, price: Any) -> list[Any]:
    return list(
        await asyncio.gather(*(try_admit(meter, key_id, f"{prefix}{i}", price) for i in range(n)))
    )


def admitted(results: list[Any]) -> int:
    return sum(1 for r in results if not isinstance(r, RateLimited))


async def test_gcra_allows_the_burst_then_the_smooth_rate(
    timed_meter: Meter, make_key: Any, price: Any, clock: Clock
) -> None:
    await make_key("key_a", rpm=60)
    results = await burst(timed_meter, "key_a", "a", 100, price)
    assert admitted(results) == 60
    refused = next(r for r in results if isinstance(r, RateLimited))
    assert refused.status_code == 429
    assert refused.headers == {
        "Retry-After": "1",
        "RateLimit-Limit": "60",
        "RateLimit-Remaining": "0",
        "RateLimit-Reset": "1",  # = Retry-After: one more is allowed then
    }

    clock.now += 0.5  # half an emission interval: nothing yet
    assert admitted(await burst(timed_meter, "key_a", "b", 5, price)) == 0
    clock.now += 0.5  # one interval: exactly one more
    assert admitted(await burst(timed_meter, "key_a", "c", 5, price)) == 1
    clock.now += 30  # thirty intervals: thirty more
    assert admitted(await burst(timed_meter, "key_a", "d", 50, price)) == 30


async def test_gcra_exact_for_rates_that_do_not_divide_a_minute(
    timed_meter: Meter, make_key: Any, price: Any, clock: Clock
) -> None:
    await make_key("key_a", rpm=7)
    assert admitted(await burst(timed_meter, "key_a", "a", 20, price)) == 7
    clock.now += 60 / 7
    assert admitted(await burst(timed_meter, "key_a", "b", 20, price)) == 1
    clock.now += 60
    assert admitted(await burst(timed_meter, "key_a", "c", 20, price)) == 7


async def test_success_carries_rate_limit_headers(
    timed_meter: Meter, make_key: Any, price: Any
) -> None:
    await make_key("key_a", rpm=60)
    first = await try_admit(timed_meter, "key_a", "r1", price)
    assert first.headers == {
        "RateLimit-Limit": "60",
        "RateLimit-Remaining": "59",
        "RateLimit-Reset": "1",
    }


async def test_client_waiting_retry_after_succeeds(
    timed_meter: Meter, make_key: Any, price: Any, clock: Clock
) -> None:
    await make_key("key_a", rpm=2)
    await burst(timed_meter, "key_a", "a", 2, price)
    refused = await try_admit(timed_meter, "key_a", "b", price)
    assert isinstance(refused, RateLimited)
    clock.now += int(refused.headers["Retry-After"])
    assert not isinstance(await try_admit(timed_meter, "key_a", "c", price), RateLimited)


async def test_refused_requests_hold_nothing_and_use_no_token(
    timed_meter: Meter, make_key: Any, price: Any, r: Any
) -> None:
    await make_key("key_a", rpm=2, budget_micro=10)
    # Refused for budget: no rate token used, nothing held.
    for i in range(5):
        with pytest.raises(BudgetExceeded):
            await try_admit(timed_meter, "key_a", f"big{i}", price, amount=11)
    assert admitted(await burst(timed_meter, "key_a", "a", 3, price)) == 2
    # Refused for rate: nothing held.
    assert (await timed_meter.usage("key_a"))["held_usd"] == "0.000002"
    assert await r.hlen("{k:key_a}:holds") == 2


async def test_in_flight_limit(meter: Meter, make_key: Any, price: Any) -> None:
    await make_key("key_a", max_concurrent=3)
    results = await burst(meter, "key_a", "a", 20, price)
    assert admitted(results) == 3
    refused = next(r for r in results if isinstance(r, RateLimited))
    assert refused.extra == {"limit_type": "concurrency"}
    assert refused.headers["Retry-After"] == "1"

    done = next(r for r in results if not isinstance(r, RateLimited))
    await meter.settle(done, price(1))
    assert admitted(await burst(meter, "key_a", "b", 20, price)) == 1


async def test_limits_read_live_from_the_key(
    meter: Meter, make_key: Any, price: Any, r: Any
) -> None:
    await make_key("key_a", max_concurrent=1)
    assert admitted(await burst(meter, "key_a", "a", 5, price)) == 1
    await r.hset("{k:key_a}:meta", "max_concurrent", "3")
    assert admitted(await burst(meter, "key_a", "b", 5, price)) == 2
    usage = await meter.usage("key_a")
    assert usage["limits"]["max_concurrent"] == 3
    assert usage["in_flight"] == 3
