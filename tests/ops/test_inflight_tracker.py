"""Shutdown waits for in-flight metered work, including settles that outlive a cancellation."""

from __future__ import annotations

import asyncio

from app.ops.shutdown import InflightTracker


async def test_drain_waits_for_tracked_requests() -> None:
    tracker = InflightTracker()
    finished: list[str] = []

    async def request() -> None:
        with tracker.track():
            await asyncio.sleep(0.05)
            finished.append("request")

    task = asyncio.create_task(request())
    await asyncio.sleep(0)
    assert tracker.count == 1
    assert await tracker.drain(timeout_s=5) is True
    assert finished == ["request"] and tracker.count == 0 and tracker.draining
    await task


async def test_drain_gives_up_after_the_timeout() -> None:
    tracker = InflightTracker()
    gate = asyncio.Event()

    async def stuck() -> None:
        with tracker.track():
            await gate.wait()

    task = asyncio.create_task(stuck())
    await asyncio.sleep(0)
    assert await tracker.drain(timeout_s=0.01) is False
    gate.set()
    await task
    assert await tracker.drain(timeout_s=0.01) is True


async def test_shielded_settle_survives_cancellation_and_is_drained() -> None:
    tracker = InflightTracker()
    settled = asyncio.Event()
    started = asyncio.Event()

    async def settle() -> str:
        started.set()
        await asyncio.sleep(0.05)
        settled.set()
        return "settled"

    async def request() -> str:
        with tracker.track():
            return await tracker.shield(settle())

    task = asyncio.create_task(request())
    await started.wait()
    task.cancel()  # the client went away while the settle was running
    await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled()
    assert not settled.is_set() and tracker.count == 1  # the settle is still counted
    assert await tracker.drain(timeout_s=5) is True
    assert settled.is_set() and tracker.count == 0
