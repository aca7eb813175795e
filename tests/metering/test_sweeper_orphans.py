"""The sweeper resolves the holds of dead processes exactly once, asking fal where it can.

fal itself is stood in for by a scripted outcome table (the sweeper's only dependency on the
fal client is ``outcome(endpoint, request_id)``); the end-to-end test with a SIGKILLed gateway
and the real sandbox lives in ``tests/metering/test_e2e_metering.py``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from app.metering import Meter
from app.metering.sweeper import Sweeper
from app.settings import Settings
from app.upstream.types import GeneratedImage, OutcomeState, UpstreamOutcome, UpstreamResult


class ScriptedFal:
    """fal's view of its queue: request id -> outcome; counts the questions asked."""

    def __init__(self) -> None:
        self.outcomes: dict[str, UpstreamOutcome] = {}
        self.asked: list[str] = []

    async def outcome(self, endpoint: str, request_id: str) -> UpstreamOutcome:
        self.asked.append(request_id)
        await asyncio.sleep(0.01)
        return self.outcomes.get(request_id, UpstreamOutcome(OutcomeState.UNKNOWN))


def completed(*sizes: tuple[int | None, int | None]) -> UpstreamOutcome:
    images = [
        GeneratedImage(url="https://x/y.png", width=w, height=h, content_type=None)
        for w, h in sizes
    ]
    return UpstreamOutcome(OutcomeState.COMPLETED, UpstreamResult("fal_1", images, seed=1))


@pytest.fixture
def fal() -> ScriptedFal:
    return ScriptedFal()


@pytest.fixture
def dead_meter(r: Any, settings: Settings) -> Meter:
    """A process that placed holds a minute ago and has no lease: it crashed."""
    return Meter(r, settings, "proc_dead", clock=lambda: time.time() - 60)


@pytest.fixture
def sweeper(r: Any, settings: Settings, fal: ScriptedFal) -> Sweeper:
    return Sweeper(r, settings, "proc_sweeper", fal)


async def hold(meter: Meter, key_id: str, rid: str, amount: int, price: Any, **kw: Any) -> Any:
    return await meter.admit(
        key_id=key_id,
        request_id=rid,
        model="fal-ai/flux/dev",
        operation="generate",
        estimate=price(amount, **kw),
        endpoint="fal-ai/flux/dev",
    )


async def events(r: Any, key_id: str) -> list[dict[str, str]]:
    return [f for _, f in await r.xrange(f"{{k:{key_id}}}:ledger")]


async def test_orphan_without_fal_id_is_released_and_its_slot_freed(
    dead_meter: Meter, sweeper: Sweeper, make_key: Any, price: Any, r: Any, fal: ScriptedFal
) -> None:
    await make_key("key_a", budget_micro=100_000)
    await hold(dead_meter, "key_a", "req_1", 40_000, price)
    report = await sweeper.sweep_once()
    assert report.released == ["req_1"]
    assert report.slots_freed == 1
    assert fal.asked == []
    usage = await sweeper.meter.usage("key_a")
    assert (usage["held_usd"], usage["spent_usd"], usage["in_flight"]) == (
        "0.000000",
        "0.000000",
        0,
    )
    assert [e["event"] for e in await events(r, "key_a")] == ["hold", "release"]


async def test_completed_at_fal_is_settled_from_the_image_sizes(
    dead_meter: Meter, sweeper: Sweeper, make_key: Any, price: Any, fal: ScriptedFal, r: Any
) -> None:
    await make_key("key_a", budget_micro=100_000)
    admission = await hold(dead_meter, "key_a", "req_1", 23_594, price, pixels=2 * 786_432)
    await dead_meter.attach_upstream(admission, "fal_1")
    fal.outcomes["fal_1"] = completed((1024, 768))  # one image of the two asked for
    report = await sweeper.sweep_once()
    assert report.settled == ["req_1"]
    settle = (await events(r, "key_a"))[-1]
    assert settle["event"] == "settle"
    assert settle["amount_micro"] == "11797"
    assert settle["upstream_request_id"] == "fal_1"
    assert (await sweeper.meter.usage("key_a"))["spent_usd"] == "0.011797"


async def test_upscaler_result_without_sizes_settles_at_the_hold(
    dead_meter: Meter, sweeper: Sweeper, make_key: Any, price: Any, fal: ScriptedFal
) -> None:
    await make_key("key_a")
    admission = await hold(dead_meter, "key_a", "req_1", 94_372, price)
    await dead_meter.attach_upstream(admission, "fal_1")
    fal.outcomes["fal_1"] = completed((None, None))
    await sweeper.sweep_once()
    assert (await sweeper.meter.usage("key_a"))["spent_usd"] == "0.094372"


async def test_pending_is_left_for_a_later_sweep_failed_is_released(
    dead_meter: Meter, sweeper: Sweeper, make_key: Any, price: Any, fal: ScriptedFal
) -> None:
    await make_key("key_a")
    first = await hold(dead_meter, "key_a", "req_1", 1_000, price)
    second = await hold(dead_meter, "key_a", "req_2", 2_000, price)
    await dead_meter.attach_upstream(first, "fal_1")
    await dead_meter.attach_upstream(second, "fal_2")
    fal.outcomes["fal_1"] = UpstreamOutcome(OutcomeState.PENDING)
    fal.outcomes["fal_2"] = UpstreamOutcome(OutcomeState.FAILED)
    report = await sweeper.sweep_once()
    assert (report.pending, report.released) == (["req_1"], ["req_2"])
    assert (await sweeper.meter.usage("key_a"))["held_usd"] == "0.001000"

    fal.outcomes["fal_1"] = completed((1000, 1000))
    report = await sweeper.sweep_once()
    assert report.settled == ["req_1"]
    usage = await sweeper.meter.usage("key_a")
    assert (usage["held_usd"], usage["spent_usd"]) == ("0.000000", "0.001000")


async def test_live_processes_are_left_alone(
    r: Any, settings: Settings, sweeper: Sweeper, make_key: Any, price: Any
) -> None:
    await make_key("key_a")
    live = Sweeper(r, settings, "proc_live", ScriptedFal())
    await live.heartbeat()
    await hold(
        Meter(r, settings, "proc_live", clock=lambda: time.time() - 60), "key_a", "r", 5, price
    )
    report = await sweeper.sweep_once()
    assert (report.released, report.settled, report.slots_freed) == ([], [], 0)
    assert (await sweeper.meter.usage("key_a"))["held_usd"] == "0.000005"


async def test_two_sweepers_racing_resolve_each_hold_exactly_once(
    r: Any, settings: Settings, dead_meter: Meter, make_key: Any, price: Any, fal: ScriptedFal
) -> None:
    await make_key("key_a", budget_micro=10**9)
    for i in range(60):
        admission = await hold(dead_meter, "key_a", f"req_{i}", 2_000, price)
        if i % 3:
            await dead_meter.attach_upstream(admission, f"fal_{i}")
            fal.outcomes[f"fal_{i}"] = completed((1000, 1000))  # 15_000 unit -> 1000 x 1 MP
    sweepers = [Sweeper(r, settings, f"proc_sweeper_{n}", fal) for n in range(3)]
    reports = await asyncio.gather(*(s.sweep_once() for s in sweepers for _ in range(2)))

    settled = [rid for rep in reports for rid in rep.settled]
    released = [rid for rep in reports for rid in rep.released]
    assert len(settled) == len(set(settled)) == 40
    assert len(released) == len(set(released)) == 20
    assert len(fal.asked) == 40  # the claim kept sweepers from asking twice
    ledger = await events(r, "key_a")
    settle_total = sum(int(e["amount_micro"]) for e in ledger if e["event"] == "settle")
    assert settle_total == 40 * 2_000
    usage = await sweepers[0].meter.usage("key_a")
    assert (usage["held_usd"], usage["spent_usd"]) == ("0.000000", "0.080000")


async def test_settle_after_the_sweeper_does_not_count_twice(
    dead_meter: Meter, sweeper: Sweeper, make_key: Any, price: Any, fal: ScriptedFal
) -> None:
    await make_key("key_a")
    admission = await hold(dead_meter, "key_a", "req_1", 5_000, price)
    await dead_meter.attach_upstream(admission, "fal_1")
    fal.outcomes["fal_1"] = completed((100, 100))
    await sweeper.sweep_once()
    late = await dead_meter.settle(admission, price(5_000))
    assert late.already_resolved
    assert late.charged == 150  # what the sweeper recorded
    assert (await sweeper.meter.usage("key_a"))["spent_usd"] == "0.000150"
    assert not await dead_meter.attach_upstream(admission, "fal_1")


async def test_lease_is_taken_on_start_and_given_up_on_stop(
    r: Any, settings: Settings, fal: ScriptedFal
) -> None:
    sweeper = Sweeper(r, settings.model_copy(update={"sweeper_interval_s": 0.05}), "proc_x", fal)
    await sweeper.start()
    assert await r.exists("falgate:proc:proc_x")
    await sweeper.stop()
    assert not await r.exists("falgate:proc:proc_x")


async def test_a_hold_older_than_any_request_is_resolved_even_if_its_process_lives(
    r: Any, settings: Settings, sweeper: Sweeper, make_key: Any, price: Any
) -> None:
    await make_key("key_a")
    live = Sweeper(r, settings, "proc_live", ScriptedFal())
    await live.heartbeat()
    lost = Meter(r, settings, "proc_live", clock=lambda: time.time() - 3 * 3600)
    await hold(lost, "key_a", "req_lost", 5, price)  # its settle never reached Redis
    report = await sweeper.sweep_once()
    assert report.released == ["req_lost"]
    assert (await sweeper.meter.usage("key_a"))["held_usd"] == "0.000000"
