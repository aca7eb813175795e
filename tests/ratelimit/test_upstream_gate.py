"""The global upstream concurrency cap: exact across processes, fair across keys, leased."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from app.errors import Unavailable
from app.ratelimit.upstream_gate import UpstreamGate
from app.settings import Settings


def gate(r: Any, settings: Settings, process: str = "proc_a", **overrides: Any) -> UpstreamGate:
    return UpstreamGate(r, settings.model_copy(update=overrides), process)


async def wait_for(predicate: Any) -> None:
    for _ in range(2000):
        if await predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never became true")


async def test_never_more_than_the_cap_across_processes(
    gate_redis: Any, gate_settings: Settings
) -> None:
    gates = [
        gate(gate_redis, gate_settings, f"proc_{i}", upstream_max_concurrent=3) for i in range(3)
    ]
    active = 0
    peak = 0
    release = asyncio.Event()

    async def one(i: int) -> None:
        nonlocal active, peak
        async with gates[i % 3].slot(f"key_{i % 4}", f"req_{i}"):
            active += 1
            peak = max(peak, active)
            if active == 3:
                release.set()
            await release.wait()
            await asyncio.sleep(0)
            active -= 1

    await asyncio.gather(*(one(i) for i in range(30)))
    assert peak == 3
    stats = await gates[0].stats()
    assert (stats.in_use, stats.waiting) == (0, 0)


async def test_a_flooding_key_does_not_starve_another(
    gate_redis: Any, gate_settings: Settings
) -> None:
    g = gate(gate_redis, gate_settings, upstream_max_concurrent=2)
    await g.acquire("key_flood", "flood_0")
    await g.acquire("key_flood", "flood_1")
    order: list[str] = []

    async def waiter(key_id: str, rid: str) -> None:
        await g.acquire(key_id, rid)
        order.append(rid)

    flood = []
    for i in range(2, 12):  # queued one after the other: flood_2 is the oldest
        flood.append(asyncio.create_task(waiter("key_flood", f"flood_{i}")))
        await wait_for(lambda n=i - 1: _waiting(g, n))
    quiet = asyncio.create_task(waiter("key_quiet", "quiet_0"))
    await wait_for(lambda: _waiting(g, 11))

    await g.release("flood_0")  # the quiet key holds nothing: it is served first
    await quiet
    assert order == ["quiet_0"]
    await g.release("flood_1")
    await wait_for(lambda: _granted(order, 2))
    assert order[1] == "flood_2"  # then the flood, oldest first

    for task in flood:
        task.cancel()
    await asyncio.gather(*flood, return_exceptions=True)
    await wait_for(lambda: _waiting(g, 0))


async def _waiting(g: UpstreamGate, n: int) -> bool:
    return (await g.stats()).waiting == n


async def _granted(order: list[str], n: int) -> bool:
    return len(order) >= n


async def test_times_out_with_503_and_leaves_the_queue(
    gate_redis: Any, gate_settings: Settings
) -> None:
    g = gate(gate_redis, gate_settings, upstream_max_concurrent=1, upstream_queue_timeout_s=0.2)
    await g.acquire("key_a", "req_1")
    with pytest.raises(Unavailable) as info:
        await g.acquire("key_b", "req_2")
    assert info.value.status_code == 503
    assert info.value.headers["Retry-After"] == "1"
    stats = await g.stats()
    assert (stats.in_use, stats.waiting) == (1, 0)


async def test_a_crashed_process_slots_come_back_after_its_lease(
    gate_redis: Any, gate_settings: Settings
) -> None:
    crashed = gate(gate_redis, gate_settings, "proc_dead", upstream_max_concurrent=1)
    await crashed.acquire("key_a", "req_dead")  # never released, never renewed
    alive = gate(gate_redis, gate_settings, "proc_alive", upstream_max_concurrent=1)
    await alive.acquire("key_b", "req_live")  # waits for the lease (1 s) to run out
    stats = await alive.stats()
    assert (stats.in_use, stats.waiting) == (1, 0)


async def test_a_cancelled_waiter_gives_up_its_place(
    gate_redis: Any, gate_settings: Settings
) -> None:
    g = gate(gate_redis, gate_settings, upstream_max_concurrent=1)
    await g.acquire("key_a", "req_1")
    waiting = asyncio.create_task(g.acquire("key_b", "req_2"))
    await wait_for(lambda: _waiting(g, 1))
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await g.release("req_1")
    stats = await g.stats()
    assert (stats.in_use, stats.waiting) == (0, 0)


async def _commands_inside(r: Any, work: Any) -> int:
    """How many commands the gate's script ran inside Redis for ``work`` (``commandstats``)."""
    await r.config_resetstat()
    await work
    stats = await r.info("commandstats")
    # Neither the script call itself nor this function's own CONFIG and INFO.
    skipped = {"cmdstat_evalsha", "cmdstat_config", "cmdstat_info"}
    return sum(int(row["calls"]) for name, row in stats.items() if name not in skipped)


async def test_a_free_slot_with_nobody_waiting_is_taken_and_given_back_cheaply(
    gate_redis: Any, gate_settings: Settings
) -> None:
    """The common case does not scan for expired leases or queue order: every command run
    inside a script costs Redis CPU on every request (issue 15)."""
    g = gate(gate_redis, gate_settings, upstream_max_concurrent=2)
    await g.acquire("key_a", "req_0")  # one slot of two taken: still nobody waits
    assert await _commands_inside(gate_redis, g.acquire("key_a", "req_1")) <= 7
    assert await _commands_inside(gate_redis, g.release("req_1")) <= 7
    await g.release("req_0")
    stats = await g.stats()
    assert (stats.in_use, stats.waiting) == (0, 0)
    assert await gate_redis.hgetall("{falgate:gate}:perkey") == {}


async def test_an_expired_slot_below_the_cap_is_reclaimed_once_it_matters(
    gate_redis: Any, gate_settings: Settings
) -> None:
    crashed = gate(gate_redis, gate_settings, "proc_dead", upstream_max_concurrent=2)
    await crashed.acquire("key_a", "req_dead")  # never released, never renewed
    await asyncio.sleep(1.1)  # its lease (1 s) ran out
    alive = gate(gate_redis, gate_settings, "proc_alive", upstream_max_concurrent=2)
    await alive.acquire("key_b", "req_1")  # a free slot: taken at once
    # The cap is now reached on paper; the next one reclaims the dead slot instead of waiting.
    await asyncio.wait_for(alive.acquire("key_b", "req_2"), timeout=0.5)
    stats = await alive.stats()
    assert (stats.in_use, stats.waiting) == (2, 0)
    assert await gate_redis.hgetall("{falgate:gate}:perkey") == {"key_b": "2"}
    await alive.release("req_1")
    await alive.release("req_2")
    await crashed.acquire("key_a", "req_3")
    await asyncio.sleep(1.1)
    assert (await alive.stats()).in_use == 0  # the stats do not count expired slots
