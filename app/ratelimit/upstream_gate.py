"""The global cap on concurrent requests towards fal, shared by every gateway process.

fal gives the account a fixed number of concurrent jobs; ``FALGATE_UPSTREAM_MAX_CONCURRENT``
keeps the gateway under it. ``async with gate.slot(key_id, request_id):`` waits for a slot:

- fairly: a free slot goes to the waiting key that holds the fewest slots, oldest waiter
  first, so one key's burst cannot starve another key;
- at most ``FALGATE_UPSTREAM_QUEUE_TIMEOUT_S``, then **503** ``unavailable`` with
  ``Retry-After``: the gateway as a whole is saturated, which is not the caller's own rate limit
  (that is a 429) and says nothing about the request itself;
- with leases: holders and waiters renew theirs while they run; a crashed process stops
  renewing and its slots are reclaimed once the lease (``FALGATE_PROCESS_LEASE_S``) runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from app.errors import Unavailable
from app.metering.lua import LuaScript, ScriptCall, store_errors
from app.settings import Settings

log = logging.getLogger("falgate.gate")

_TAG = "{falgate:gate}"
GATE_KEYS = [
    f"{_TAG}:holders",
    f"{_TAG}:owners",
    f"{_TAG}:perkey",
    f"{_TAG}:waiters",
    f"{_TAG}:wleases",
    f"{_TAG}:seq",
]


@dataclass(frozen=True)
class GateStats:
    capacity: int
    in_use: int
    waiting: int


class UpstreamGate:
    """Grants at most ``settings.upstream_max_concurrent`` slots across all processes."""

    def __init__(
        self,
        redis: Any,
        settings: Settings,
        process_id: str,
        *,
        poll_interval_s: float = 0.02,
        max_poll_interval_s: float = 0.1,
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.process_id = process_id
        self.capacity = settings.upstream_max_concurrent
        self.lease_ms = max(1000, int(settings.process_lease_s * 1000))
        self.poll_interval_s = poll_interval_s
        self.max_poll_interval_s = max_poll_interval_s
        self._script = LuaScript(redis, __package__, "upstream_gate.lua")

    async def _call(self, op: str, *args: str) -> Any:
        with store_errors("The upstream concurrency gate"):
            return await self._script(GATE_KEYS, [op, self.capacity, self.lease_ms, *args])

    def acquire_call(self, key_id: str, request_id: str) -> ScriptCall:
        """One acquire attempt as a script call, to run together with the admission script:
        its reply says whether the slot was granted at once (see :meth:`granted`)."""
        return self._script.call(
            GATE_KEYS, ["acquire", self.capacity, self.lease_ms, request_id, key_id]
        )

    def release_call(self, request_id: str) -> ScriptCall:
        """:meth:`release` as a script call, to run together with the settle script."""
        return self._script.call(GATE_KEYS, ["release", self.capacity, self.lease_ms, request_id])

    def renew_call(self, request_ids: list[str]) -> ScriptCall:
        """Renew these held slots' leases (the lease keeper batches every live request)."""
        return self._script.call(GATE_KEYS, ["renew", self.capacity, self.lease_ms, *request_ids])

    @staticmethod
    def granted(reply: Any) -> bool:
        """Whether an acquire reply (or the error it was) granted the slot."""
        return not isinstance(reply, Exception) and int(reply[0]) == 1

    @contextlib.asynccontextmanager
    async def renewing(self, request_id: str) -> AsyncIterator[None]:
        """Keep renewing an acquired slot's lease for the duration of the block."""
        done = asyncio.Event()
        renewer = asyncio.create_task(self._renew(request_id, done))
        try:
            yield
        finally:
            done.set()
            renewer.cancel()
            await asyncio.wait({renewer}, timeout=1.0)

    @contextlib.asynccontextmanager
    async def slot(self, key_id: str, request_id: str) -> AsyncIterator[None]:
        """Hold one upstream slot for the duration of the block (waiting for it if needed)."""
        await self.acquire(key_id, request_id)
        try:
            async with self.renewing(request_id):
                yield
        finally:
            await asyncio.shield(self.release(request_id))

    async def acquire(self, key_id: str, request_id: str) -> None:
        """Wait until ``request_id`` holds a slot; ``Unavailable`` after the queue timeout."""
        deadline = time.monotonic() + self.settings.upstream_queue_timeout_s
        interval = self.poll_interval_s
        try:
            while True:
                reply = await self._call("acquire", request_id, key_id)
                if int(reply[0]) == 1:
                    return
                if time.monotonic() >= deadline:
                    raise Unavailable(
                        "The gateway is at its concurrency limit towards fal; "
                        "nothing was charged. Try again shortly.",
                        headers={"Retry-After": "1"},
                    )
                await asyncio.sleep(interval)
                interval = min(self.max_poll_interval_s, interval * 1.5)
        except BaseException:
            # Timed out, cancelled (client went away) or Redis failed: give up the place in the
            # queue, and the slot if it was granted meanwhile.
            await asyncio.shield(self.release(request_id))
            raise

    async def release(self, request_id: str) -> None:
        """Free the slot (or the place in the queue); best effort, the lease is the backstop."""
        try:
            await self._call("release", request_id)
        except Unavailable as exc:
            log.warning("could not release upstream slot %s: %s", request_id, exc.__cause__)

    async def _renew(self, request_id: str, done: asyncio.Event) -> None:
        while not done.is_set():
            await asyncio.sleep(self.lease_ms / 3000)
            try:
                await self._call("renew", request_id)
            except Unavailable:
                continue

    async def stats(self) -> GateStats:
        """Slots in use and requests waiting, across all processes."""
        in_use, waiting = await self._call("stats")
        return GateStats(capacity=self.capacity, in_use=int(in_use), waiting=int(waiting))


__all__ = ["GATE_KEYS", "GateStats", "UpstreamGate"]
