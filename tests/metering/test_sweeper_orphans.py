"""The resolver settles or releases holds whose lease ran out, exactly once, asking fal.

"fal" here is the project's sandbox, served in-process, asked through the real ``FalClient``;
each test makes real sandbox jobs in the state it needs (finished, still running, failed).
The end-to-end test with a SIGKILLed gateway lives in ``tests/metering/test_e2e_metering.py``.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from PIL import Image

from app.catalog import price_images
from app.errors import BudgetExceeded
from app.metering import Meter
from app.metering.lua import run_together
from app.metering.meter import ABANDONED
from app.metering.sweeper import Sweeper
from app.money import format_usd
from app.sandbox import SandboxControl, embedded_sandbox
from app.settings import Settings
from app.upstream.client import FalClient

FLUX = "fal-ai/flux/dev"
TOPAZ = "fal-ai/topaz/upscale/image"


class StatusCounter(httpx.AsyncHTTPTransport):
    """The network under the fal client, counting the status questions it carries."""

    def __init__(self) -> None:
        super().__init__()
        self.status_calls = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/status"):
            self.status_calls += 1
        return await super().handle_async_request(request)


@dataclass
class SandboxFal:
    client: FalClient
    base: str
    control: SandboxControl
    network: StatusCounter
    http: httpx.AsyncClient = field(default_factory=lambda: httpx.AsyncClient(timeout=10))

    @property
    def asked(self) -> int:
        return self.network.status_calls

    async def job(self, endpoint: str, arguments: dict[str, Any], *, finish: bool = True) -> str:
        """Submit a real queue job to the sandbox; wait until it finished unless told not to."""
        headers = {"Authorization": "Key test"}
        submitted = await self.http.post(
            f"{self.base}/queue/{endpoint}", json=arguments, headers=headers
        )
        submitted.raise_for_status()
        body = submitted.json()
        while finish:
            status = await self.http.get(body["status_url"], headers=headers)
            if status.json()["status"] == "COMPLETED":
                break
            await asyncio.sleep(0.01)
        return str(body["request_id"])

    async def image(self, width: int, height: int) -> str:
        return await self.job(
            FLUX, {"prompt": "x", "image_size": {"width": width, "height": height}}
        )


def _png_data_uri() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture
async def fal(settings: Settings) -> AsyncIterator[SandboxFal]:
    async with embedded_sandbox("127.0.0.1", 0, latency_ms=0) as base:
        network = StatusCounter()
        client = FalClient(
            settings.model_copy(
                update={"fal_run_url": base, "fal_queue_url": base + "/queue", "fal_key": None}
            ),
            transport=network,
        )
        await client.start()
        control = SandboxControl(base)
        fal = SandboxFal(client, base, control, network)
        try:
            yield fal
        finally:
            await fal.http.aclose()
            await control.aclose()
            await client.aclose()


@pytest.fixture
def dead_meter(r: Any, settings: Settings) -> Meter:
    """A process that placed holds a minute ago and has no lease: it crashed."""
    return Meter(r, settings, "proc_dead", clock=lambda: time.time() - 60)


@pytest.fixture
def sweeper(r: Any, settings: Settings, fal: SandboxFal) -> Sweeper:
    return Sweeper(r, settings, "proc_sweeper", fal.client)


async def hold(
    meter: Meter, key_id: str, rid: str, amount: int, price: Any, endpoint: str = FLUX, **kw: Any
) -> Any:
    return await meter.admit(
        key_id=key_id,
        request_id=rid,
        model="fal-ai/flux/dev",
        operation="generate",
        estimate=price(amount, **kw),
        endpoint=endpoint,
    )


async def events(r: Any, key_id: str) -> list[dict[str, str]]:
    return [f for _, f in await r.xrange(f"{{k:{key_id}}}:ledger")]


async def test_orphan_without_fal_id_is_released_and_its_slot_freed(
    dead_meter: Meter, sweeper: Sweeper, make_key: Any, price: Any, r: Any, fal: SandboxFal
) -> None:
    await make_key("key_a", budget_micro=100_000)
    await hold(dead_meter, "key_a", "req_1", 40_000, price)
    report = await sweeper.sweep_once()
    assert report.released == ["req_1"]
    assert fal.asked == 0
    usage = await sweeper.meter.usage("key_a")
    assert (usage["held_usd"], usage["spent_usd"], usage["in_flight"]) == (
        "0.000000",
        "0.000000",
        0,
    )
    assert [e["event"] for e in await events(r, "key_a")] == ["hold", "release"]


async def test_completed_at_fal_is_settled_from_the_image_sizes(
    dead_meter: Meter, sweeper: Sweeper, make_key: Any, price: Any, fal: SandboxFal, r: Any
) -> None:
    await make_key("key_a", budget_micro=100_000)
    admission = await hold(dead_meter, "key_a", "req_1", 23_594, price, pixels=2 * 786_432)
    fal_id = await fal.image(1024, 768)  # one image of the two asked for
    await dead_meter.attach_upstream(admission, fal_id)
    report = await sweeper.sweep_once()
    assert report.settled == ["req_1"]
    settle = (await events(r, "key_a"))[-1]
    assert settle["event"] == "settle"
    assert settle["amount_micro"] == "11797"
    assert settle["upstream_request_id"] == fal_id
    assert (await sweeper.meter.usage("key_a"))["spent_usd"] == "0.011797"


async def test_upscaler_result_without_sizes_settles_at_the_hold(
    dead_meter: Meter, sweeper: Sweeper, make_key: Any, price: Any, fal: SandboxFal
) -> None:
    await make_key("key_a")
    admission = await hold(dead_meter, "key_a", "req_1", 94_372, price, endpoint=TOPAZ)
    # topaz answers without width and height, as the real one does
    fal_id = await fal.job(TOPAZ, {"image_url": _png_data_uri(), "upscale_factor": 2})
    await dead_meter.attach_upstream(admission, fal_id)
    await sweeper.sweep_once()
    assert (await sweeper.meter.usage("key_a"))["spent_usd"] == "0.094372"


async def test_pending_is_left_for_a_later_sweep_failed_is_released(
    dead_meter: Meter, sweeper: Sweeper, make_key: Any, price: Any, fal: SandboxFal, r: Any
) -> None:
    await make_key("key_a")
    first = await hold(dead_meter, "key_a", "req_1", 1_000, price)
    second = await hold(dead_meter, "key_a", "req_2", 2_000, price)
    await fal.control.configure(latency_ms=60_000)  # still running when first asked
    running = await fal.job(FLUX, {"prompt": "x", "image_size": "square"}, finish=False)
    await fal.control.configure(
        latency_ms=0, faults=[{"kind": "error", "scope": "job", "status_code": 500}]
    )
    failing = await fal.job(FLUX, {"prompt": "x"})
    await dead_meter.attach_upstream(first, running)
    await dead_meter.attach_upstream(second, failing)
    report = await sweeper.sweep_once()
    assert (report.pending, report.released) == (["req_1"], ["req_2"])
    assert (await sweeper.meter.usage("key_a"))["held_usd"] == "0.001000"

    await fal.control.reset()  # cancels the running job: fal finished it without a result
    done = await fal.image(1000, 1000)
    await dead_meter.attach_upstream(first, done)  # the hold now points at a finished job
    assert (await sweeper.sweep_once()).pending == []  # claimed: not asked again at once
    await r.zadd("{k:key_a}:leases", {"req_1": 0})  # ... until the claim ran out
    report = await sweeper.sweep_once()
    assert report.settled == ["req_1"]
    usage = await sweeper.meter.usage("key_a")
    assert (usage["held_usd"], usage["spent_usd"]) == ("0.000000", "0.001000")


async def test_holds_within_their_lease_are_left_alone(
    r: Any, settings: Settings, sweeper: Sweeper, make_key: Any, price: Any, fal: SandboxFal
) -> None:
    await make_key("key_a")
    live = Meter(r, settings, "proc_live")
    await hold(live, "key_a", "r", 5, price)
    report = await sweeper.sweep_once()
    assert (report.released, report.settled, report.pending) == ([], [], [])
    assert (await sweeper.meter.usage("key_a"))["held_usd"] == "0.000005"
    # Its request renews the lease while it lives; once that stops, the lease runs out.
    (renewed,) = await run_together(r, live.renew_call("key_a", ["r"]))
    assert renewed == 1
    await r.zadd("{k:key_a}:leases", {"r": 0})
    assert (await sweeper.sweep_once()).released == ["r"]


async def test_two_sweepers_racing_resolve_each_hold_exactly_once(
    r: Any, settings: Settings, dead_meter: Meter, make_key: Any, price: Any, fal: SandboxFal
) -> None:
    await make_key("key_a", budget_micro=10**9)
    for i in range(60):
        admission = await hold(dead_meter, "key_a", f"req_{i}", 2_000, price)
        if i % 3:  # 15_000 unit -> 1000 x 1 MP
            await dead_meter.attach_upstream(admission, await fal.image(1000, 1000))
    sweepers = [Sweeper(r, settings, f"proc_sweeper_{n}", fal.client) for n in range(3)]
    reports = await asyncio.gather(*(s.sweep_once() for s in sweepers for _ in range(2)))

    settled = [rid for rep in reports for rid in rep.settled]
    released = [rid for rep in reports for rid in rep.released]
    assert len(settled) == len(set(settled)) == 40
    assert len(released) == len(set(released)) == 20
    assert fal.asked == 40  # the claim kept sweepers from asking twice
    ledger = await events(r, "key_a")
    settle_total = sum(int(e["amount_micro"]) for e in ledger if e["event"] == "settle")
    assert settle_total == 40 * 2_000
    usage = await sweepers[0].meter.usage("key_a")
    assert (usage["held_usd"], usage["spent_usd"]) == ("0.000000", "0.080000")


async def test_settle_after_the_sweeper_does_not_count_twice(
    dead_meter: Meter, sweeper: Sweeper, make_key: Any, price: Any, fal: SandboxFal
) -> None:
    await make_key("key_a")
    admission = await hold(dead_meter, "key_a", "req_1", 5_000, price)
    fal_id = await fal.image(100, 100)
    await dead_meter.attach_upstream(admission, fal_id)
    await sweeper.sweep_once()
    late = await dead_meter.settle(admission, price(5_000))
    assert late.already_resolved
    assert late.charged == 150  # what the sweeper recorded
    assert (await sweeper.meter.usage("key_a"))["spent_usd"] == "0.000150"
    assert not await dead_meter.attach_upstream(admission, fal_id)


async def test_lease_is_taken_on_start_and_given_up_on_stop(
    r: Any, settings: Settings, fal: SandboxFal
) -> None:
    sweeper = Sweeper(
        r, settings.model_copy(update={"sweeper_interval_s": 0.05}), "proc_x", fal.client
    )
    await sweeper.start()
    assert await r.exists("falgate:proc:proc_x")
    await sweeper.stop()
    assert not await r.exists("falgate:proc:proc_x")


async def test_a_hold_whose_lease_ran_out_is_resolved_even_if_its_process_lives(
    r: Any, settings: Settings, sweeper: Sweeper, make_key: Any, price: Any, fal: SandboxFal
) -> None:
    await make_key("key_a")
    live = Sweeper(r, settings, "proc_live", fal.client)
    await live.heartbeat()
    lost = Meter(r, settings, "proc_live", clock=lambda: time.time() - 3 * 3600)
    await hold(lost, "key_a", "req_lost", 5, price)  # its settle never reached Redis, and
    # its request stopped renewing the lease long ago
    report = await sweeper.sweep_once()
    assert report.released == ["req_lost"]
    assert (await sweeper.meter.usage("key_a"))["held_usd"] == "0.000000"


# A hold released as abandoned whose request was alive after all (its process stalled, or cut
# off from Redis, for longer than a lease) and whose job fal accepted: put back and billed.


async def abandoned(
    r: Any, settings: Settings, sweeper: Sweeper, price: Any, rid: str, amount: int, **kw: Any
) -> tuple[Meter, Any]:
    """A live process's hold that the resolver released because its lease ran out."""
    stalled = Meter(r, settings, "proc_stalled")
    admission = await hold(stalled, "key_a", rid, amount, price, **kw)
    await r.zadd("{k:key_a}:leases", {rid: 0})  # no renewal reached Redis for a lease
    assert (await sweeper.sweep_once()).released == [rid]
    return stalled, admission


async def test_a_job_fal_accepted_after_its_hold_was_abandoned_is_put_back_and_settled(
    r: Any, settings: Settings, sweeper: Sweeper, make_key: Any, price: Any, fal: SandboxFal
) -> None:
    await make_key("key_a", budget_micro=100_000)
    stalled, admission = await abandoned(
        r, settings, sweeper, price, "req_1", 23_594, pixels=2 * 786_432
    )
    assert (await stalled.usage("key_a"))["held_usd"] == "0.000000"

    fal_id = await fal.image(1024, 768)  # fal accepted (and did) the job after all
    assert await stalled.attach_upstream(admission, fal_id)
    usage = await stalled.usage("key_a")
    assert (usage["held_usd"], usage["in_flight"]) == ("0.023594", 1)
    record = await stalled.request_record("key_a", "req_1")
    assert record is not None
    assert (record.status, record.upstream_request_id) == ("pending", fal_id)

    actual = price_images([(1024, 768)], 15_000)
    first, second = await asyncio.gather(
        stalled.settle(admission, actual), stalled.settle(admission, actual)
    )
    assert sorted([first.already_resolved, second.already_resolved]) == [False, True]
    assert not first.reinstated and not second.reinstated  # put back by the attach already
    assert first.charged == second.charged == actual.amount
    ledger = await events(r, "key_a")
    assert [(e["event"], e.get("reason")) for e in ledger] == [
        ("hold", None),
        ("release", "abandoned"),
        ("hold", "reinstated"),
        ("settle", "completed"),
    ]
    assert ledger[2]["upstream_request_id"] == fal_id
    assert ledger[2]["amount_micro"] == "23594"
    assert int(ledger[3]["amount_micro"]) == actual.amount
    usage = await stalled.usage("key_a")
    assert (usage["held_usd"], usage["in_flight"]) == ("0.000000", 0)
    assert usage["spent_usd"] == format_usd(actual.amount)
    record = await stalled.request_record("key_a", "req_1")
    assert record is not None and (record.status, record.charged) == ("completed", actual.amount)


async def test_a_sync_job_whose_hold_was_abandoned_is_billed_by_its_settle(
    r: Any, settings: Settings, sweeper: Sweeper, make_key: Any, price: Any, fal: SandboxFal
) -> None:
    """fal's sync API gives no id to record before the images: the settle puts the hold back."""
    await make_key("key_a", budget_micro=100_000)
    stalled, admission = await abandoned(r, settings, sweeper, price, "req_1", 20_000)
    settlement = await stalled.settle(admission, price(15_000))
    assert (settlement.charged, settlement.released, settlement.already_resolved) == (
        15_000,
        5_000,
        False,
    )
    assert settlement.reinstated
    ledger = await events(r, "key_a")
    assert [e["event"] for e in ledger] == ["hold", "release", "hold", "settle"]
    usage = await stalled.usage("key_a")
    assert (usage["spent_usd"], usage["held_usd"], usage["in_flight"]) == (
        "0.015000",
        "0.000000",
        0,
    )


@pytest.mark.parametrize("handoff", ["detached", "unresolved"])
async def test_a_job_handed_over_after_its_hold_was_abandoned_is_settled_by_the_resolver(
    handoff: str,
    r: Any,
    settings: Settings,
    sweeper: Sweeper,
    make_key: Any,
    price: Any,
    fal: SandboxFal,
) -> None:
    """fal's queue API hands the job to the resolver at once (``detached``); the request path
    hands over a job it gave up on (``unresolved``). Either hand-off puts the hold back, with
    fal's id, and the resolver settles it from fal's answer."""
    await make_key("key_a", budget_micro=100_000)
    stalled, admission = await abandoned(r, settings, sweeper, price, "req_1", 20_000)
    fal_id = await fal.image(1000, 1000)
    call = stalled.detached_call if handoff == "detached" else stalled.unresolved_call
    (handed,) = await run_together(r, call(admission, fal_id))
    assert handed == 2  # handed over after putting it back
    assert stalled.handed_over(handed, admission, fal_id)
    assert (await sweeper.sweep_once()).settled == ["req_1"]
    ledger = await events(r, "key_a")
    assert [e["event"] for e in ledger] == ["hold", "release", "hold", "settle"]
    assert ledger[-1]["upstream_request_id"] == fal_id
    assert (await sweeper.meter.usage("key_a"))["spent_usd"] == "0.015000"


async def test_a_hold_put_back_may_pass_the_budget_and_the_ledger_shows_it(
    r: Any, settings: Settings, sweeper: Sweeper, make_key: Any, price: Any, fal: SandboxFal
) -> None:
    """The one exception to settled + held <= budget: the released money went to another
    request meanwhile, and fal billed both jobs."""
    await make_key("key_a", budget_micro=30_000)
    stalled, first = await abandoned(r, settings, sweeper, price, "req_1", 20_000)
    live = Meter(r, settings, "proc_live")
    second = await hold(live, "key_a", "req_2", 20_000, price)  # the room the release gave
    await live.settle(second, price(20_000))
    assert (await stalled.settle(first, price(20_000))).charged == 20_000
    usage = await live.usage("key_a")
    assert (usage["spent_usd"], usage["remaining_usd"]) == ("0.040000", "0.000000")
    with pytest.raises(BudgetExceeded):
        await hold(live, "key_a", "req_3", 1, price)


async def test_only_a_hold_the_resolver_abandoned_is_put_back(
    r: Any, settings: Settings, make_key: Any, price: Any, fal: SandboxFal
) -> None:
    """A hold its own request released (it failed before fal accepted the job) stays released."""
    await make_key("key_a", budget_micro=100_000)
    meter = Meter(r, settings, "proc_live")
    admission = await hold(meter, "key_a", "req_1", 20_000, price)
    await meter.release(admission, "upstream_error")
    assert not await meter.attach_upstream(admission, await fal.image(100, 100))
    settlement = await meter.settle(admission, price(20_000))
    assert (settlement.charged, settlement.already_resolved) == (0, True)
    (handed,) = await run_together(r, meter.detached_call(admission, "fal_x"))
    assert handed == 0
    assert [e["event"] for e in await events(r, "key_a")] == ["hold", "release"]
    assert (await meter.usage("key_a"))["spent_usd"] == "0.000000"


async def test_a_hold_given_fal_id_after_the_resolver_looked_is_not_released(
    r: Any, settings: Settings, sweeper: Sweeper, make_key: Any, price: Any, fal: SandboxFal
) -> None:
    """The resolver read the hold without fal's id and decided to release it; fal's id was
    recorded in between: the release is refused and the next sweep asks fal."""
    await make_key("key_a", budget_micro=100_000)
    live = Meter(r, settings, "proc_live")
    admission = await hold(live, "key_a", "req_1", 20_000, price)
    fal_id = await fal.image(1000, 1000)
    assert await live.attach_upstream(admission, fal_id)
    stale = await sweeper.meter.resolve_hold("key_a", "req_1", settle=False, reason=ABANDONED)
    assert (stale.already_resolved, stale.charged) == (True, 0)
    assert await r.hexists("{k:key_a}:holds", "req_1")
    await r.zadd("{k:key_a}:leases", {"req_1": 0})
    assert (await sweeper.sweep_once()).settled == ["req_1"]
    assert [e["event"] for e in await events(r, "key_a")] == ["hold", "settle"]
    assert (await sweeper.meter.usage("key_a"))["spent_usd"] == "0.015000"
