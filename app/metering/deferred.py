"""Money writes that could not reach Redis, retried in the background until they do.

Every such write is idempotent by hold state (a release, a settle, a mark as unresolved, an
upstream slot's release), so sending it again is always safe. The case it exists for: the
admission script's reply was lost (a Redis stall past the socket timeout) after the script ran,
or before it ran. The client was told ``503 ... nothing was charged``; the release by the
request's id, retried here until Redis answers, makes that true within seconds: it releases
the hold if it was placed, or leaves a tombstone that refuses the admission if it runs later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from app.errors import Unavailable
from app.metering.lua import ScriptCall, run_together

log = logging.getLogger("falgate.deferred")

_FIRST_DELAY_S = 0.05
_MAX_DELAY_S = 1.0


class DeferredWrites:
    """Retries idempotent money writes until Redis takes them (or ``give_up_after_s``)."""

    def __init__(self, redis: Any, *, give_up_after_s: float = 600.0) -> None:
        self.redis = redis
        self.give_up_after_s = give_up_after_s
        self._tasks: set[asyncio.Task[None]] = set()

    def later(self, *calls: ScriptCall) -> None:
        """Send ``calls`` (one round trip) as soon as Redis answers."""
        task = asyncio.get_running_loop().create_task(self._retry(calls))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def pending(self) -> int:
        return len(self._tasks)

    async def _retry(self, calls: tuple[ScriptCall, ...]) -> None:
        delay = _FIRST_DELAY_S
        deadline = time.monotonic() + self.give_up_after_s
        while True:
            try:
                await run_together(self.redis, *calls)
                return
            except Unavailable:
                if time.monotonic() > deadline:
                    # The holds' leases run out and the resolver takes them instead.
                    log.error("gave up a deferred money write", extra={"calls": len(calls)})
                    return
            await asyncio.sleep(delay)
            delay = min(delay * 2, _MAX_DELAY_S)

    async def drain(self, timeout_s: float) -> None:
        """Wait (bounded) for what is pending, then stop: the leases are the backstop."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


__all__ = ["DeferredWrites"]
