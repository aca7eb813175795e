"""Holds, settlement and budgets against a real Redis."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import pytest

from app.errors import BudgetExceeded, Unauthorized, Unavailable
from app.metering import Meter
from app.metering.periods import PeriodStarts
from app.settings import Settings


async def admit(meter: Meter, key_id: str, request_id: str, amount: int, price: Any) -> Any:
    return await meter.admit(
        key_id=key_id,
        request_id=request_id,
        model="fal-ai/flux/dev",
        operation="generate",
        estimate=price(amount),
        endpoint="fal-ai/flux/dev",
    )


async def ledger(r: Any, key_id: str) -> list[dict[str, str]]:
    return [fields for _, fields in await r.xrange(f"{{k:{key_id}}}:ledger")]


async def test_hold_then_settle_charges_actual_and_frees_the_rest(
    meter: Meter, make_key: Any, price: Any, r: Any
) -> None:
    await make_key("key_a", budget_micro=100_000)
    admission = await admit(meter, "key_a", "req_1", 30_000, price)
    assert admission.hold == 30_000
    assert admission.remaining == 70_000

    settlement = await meter.settle(admission, price(20_000, pixels=500_000))
    assert (settlement.charged, settlement.released, settlement.remaining) == (
        20_000,
        10_000,
        80_000,
    )

    usage = await meter.usage("key_a")
    assert usage["spent_usd"] == "0.020000"
    assert usage["held_usd"] == "0.000000"
    assert usage["remaining_usd"] == "0.080000"
    events = await ledger(r, "key_a")
    assert [e["event"] for e in events] == ["hold", "settle"]
    assert events[1]["amount_micro"] == "20000"
    assert events[1]["pixels"] == "500000"


async def test_settle_never_charges_more_than_the_hold(
    meter: Meter, make_key: Any, price: Any
) -> None:
    await make_key("key_a", budget_micro=100_000)
    admission = await admit(meter, "key_a", "req_1", 30_000, price)
    settlement = await meter.settle(admission, price(45_000))
    assert settlement.charged == 30_000
    assert settlement.remaining == 70_000


async def test_release_frees_the_whole_hold(meter: Meter, make_key: Any, price: Any) -> None:
    await make_key("key_a", budget_micro=100_000)
    admission = await admit(meter, "key_a", "req_1", 100_000, price)
    with pytest.raises(BudgetExceeded):
        await admit(meter, "key_a", "req_2", 1, price)
    await meter.release(admission, "failed")
    again = await admit(meter, "key_a", "req_3", 100_000, price)
    assert again.remaining == 0


async def test_budget_exceeded_reports_estimate_and_remaining(
    meter: Meter, make_key: Any, price: Any
) -> None:
    await make_key("key_a", budget_micro=50_000)
    await admit(meter, "key_a", "req_1", 40_000, price)
    with pytest.raises(BudgetExceeded) as info:
        await admit(meter, "key_a", "req_2", 11_797, price)
    assert info.value.status_code == 402
    assert info.value.extra == {"estimate_usd": "0.011797", "remaining_usd": "0.010000"}


async def test_settle_and_release_are_exactly_once(
    meter: Meter, make_key: Any, price: Any, r: Any
) -> None:
    await make_key("key_a", budget_micro=100_000)
    admission = await admit(meter, "key_a", "req_1", 30_000, price)
    results = await asyncio.gather(
        meter.settle(admission, price(25_000)),
        meter.settle(admission, price(25_000)),
        meter.release(admission, "cancelled"),
    )
    first, second = results[0], results[1]
    assert first.charged == second.charged == 25_000
    assert [first.already_resolved, second.already_resolved].count(False) == 1
    usage = await meter.usage("key_a")
    assert usage["spent_usd"] == "0.025000"
    assert usage["held_usd"] == "0.000000"
    assert [e["event"] for e in await ledger(r, "key_a")] == ["hold", "settle"]


async def test_concurrent_admits_never_exceed_the_budget(
    meter: Meter, make_key: Any, price: Any, r: Any
) -> None:
    holds, hold = 37, 11_797
    await make_key("key_a", budget_micro=holds * hold)

    async def one(i: int) -> Any:
        try:
            return await admit(meter, "key_a", f"req_{i}", hold, price)
        except BudgetExceeded:
            return None

    admitted = [a for a in await asyncio.gather(*(one(i) for i in range(200))) if a]
    assert len(admitted) == holds
    await asyncio.gather(*(meter.settle(a, price(hold - 1)) for a in admitted))

    events = await ledger(r, "key_a")
    settled = sum(int(e["amount_micro"]) for e in events if e["event"] == "settle")
    assert settled == holds * (hold - 1)
    assert sum(1 for e in events if e["event"] == "hold") == holds
    usage = await meter.usage("key_a")
    assert usage["spent_usd"] == f"0.{settled:06d}"
    assert usage["held_usd"] == "0.000000"


async def test_unknown_revoked_and_expired_keys_are_refused(
    meter: Meter, make_key: Any, price: Any
) -> None:
    await make_key("key_revoked", status="revoked")
    await make_key("key_expired", expires_at=time.time() - 1)
    for key_id in ("key_missing", "key_revoked", "key_expired"):
        with pytest.raises(Unauthorized):
            await admit(meter, key_id, "req_1", 1, price)


async def test_budget_change_takes_effect_at_once(
    meter: Meter, make_key: Any, price: Any, r: Any
) -> None:
    await make_key("key_a", budget_micro=10_000)
    with pytest.raises(BudgetExceeded):
        await admit(meter, "key_a", "req_1", 20_000, price)
    await r.hset("{k:key_a}:meta", "budget_micro", "20000")
    assert (await admit(meter, "key_a", "req_2", 20_000, price)).remaining == 0
    await r.hset("{k:key_a}:meta", "budget_micro", "")
    assert (await admit(meter, "key_a", "req_3", 10**9, price)).remaining is None


async def test_unlimited_key_has_no_remaining(meter: Meter, make_key: Any, price: Any) -> None:
    await make_key("key_a")
    admission = await admit(meter, "key_a", "req_1", 5, price)
    assert admission.remaining is None
    assert (await meter.settle(admission, price(5))).remaining is None
    usage = await meter.usage("key_a")
    assert usage["budget_usd"] is None and usage["remaining_usd"] is None
    assert usage["spent_usd"] == "0.000005"


async def test_a_request_id_is_admitted_once_and_never_after_its_release(
    meter: Meter, make_key: Any, price: Any
) -> None:
    await make_key("key_a", budget_micro=100_000)
    first = await admit(meter, "key_a", "req_1", 30_000, price)
    with pytest.raises(Unavailable):
        await admit(meter, "key_a", "req_1", 30_000, price)
    assert (await meter.usage("key_a"))["held_usd"] == "0.030000"
    await meter.release(first, "failed")
    with pytest.raises(Unavailable):
        await admit(meter, "key_a", "req_1", 30_000, price)
    assert (await meter.usage("key_a"))["held_usd"] == "0.000000"


async def test_a_release_that_overtakes_its_admission_leaves_a_tombstone(
    meter: Meter, make_key: Any, price: Any
) -> None:
    """The gateway lost an admission's reply and released the id before the script ran: the
    late admission is refused, so the client's '503 nothing was charged' stays true."""
    await make_key("key_a", budget_micro=100_000)
    await meter.resolve_hold("key_a", "req_lost", settle=False, reason="admission_lost")
    with pytest.raises(Unavailable):
        await admit(meter, "key_a", "req_lost", 30_000, price)
    usage = await meter.usage("key_a")
    assert (usage["held_usd"], usage["in_flight"]) == ("0.000000", 0)


async def test_a_repeated_settle_reports_the_recorded_cost(
    meter: Meter, make_key: Any, price: Any
) -> None:
    await make_key("key_a", budget_micro=100_000)
    admission = await admit(meter, "key_a", "req_1", 30_000, price)
    first = await meter.settle(admission, price(12_345))
    again = await meter.settle(admission, price(20_000))
    assert (first.charged, first.already_resolved) == (12_345, False)
    assert (again.charged, again.released, again.already_resolved) == (12_345, 17_655, True)


@pytest.mark.parametrize(
    "moment",
    [
        "2024-02-29T23:59:59",  # a leap day, the last second of it
        "2024-03-01T00:00:00",
        "2025-12-31T23:59:59",
        "2026-01-01T00:00:00",
        "2100-02-28T12:00:00",  # not a leap year
        "2000-02-29T06:00:00",  # a leap year although a century
        "2026-12-01T21:00:00",
    ],
)
async def test_periods_come_from_the_scripts_own_calendar(
    r: Any, settings: Settings, make_key: Any, price: Any, moment: str
) -> None:
    """The day and month a charge counts against are computed inside the script from the
    (Redis) clock, and agree with the UTC calendar at every boundary."""
    at = datetime.fromisoformat(moment).replace(tzinfo=UTC).timestamp()
    meter = Meter(r, settings, "proc_clock", clock=lambda: at)
    await make_key("key_a", budget_micro=100_000, period="daily")
    await meter.settle(await admit(meter, "key_a", "req_1", 1_000, price), price(1_000))
    starts = PeriodStarts.at(at)
    counters = await r.hgetall("{k:key_a}:budget")
    assert counters[f"d:{starts.day}"] == counters[f"m:{starts.month}"] == "1000"
    assert (await meter.usage("key_a"))["spent_usd"] == "0.001000"


async def test_a_key_stored_without_a_period_is_enforced_as_shown_monthly(
    r: Any, settings: Settings, make_key: Any, price: Any
) -> None:
    now = [datetime(2026, 11, 30, 12, tzinfo=UTC).timestamp()]
    meter = Meter(r, settings, "proc_clock", clock=lambda: now[0])
    await make_key("key_a", budget_micro=10_000, period="")
    assert (await meter.usage("key_a"))["period"] == "monthly"
    await meter.settle(await admit(meter, "key_a", "req_1", 10_000, price), price(10_000))
    with pytest.raises(BudgetExceeded):
        await admit(meter, "key_a", "req_2", 1, price)
    now[0] = datetime(2026, 12, 1, 0, 0, 1, tzinfo=UTC).timestamp()  # a new month
    assert (await admit(meter, "key_a", "req_3", 10_000, price)).remaining == 0
