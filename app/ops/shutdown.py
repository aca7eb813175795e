"""Graceful shutdown: know what metered work is in flight, and wait for it to finish.

On SIGTERM uvicorn stops accepting connections and gives running requests
``timeout_graceful_shutdown`` (``FALGATE_SHUTDOWN_GRACE_S``) to finish, then cancels them; the
request path releases its hold when cancelled, shielding the release
(:meth:`InflightTracker.shield`) so the cancellation cannot interrupt it. Only then does the
lifespan's shutdown run: it calls :meth:`InflightTracker.drain` so that those shielded
settles/releases complete before the Redis client is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Iterator
from typing import TypeVar

T = TypeVar("T")


class InflightTracker:
    """Counts metered requests in flight in this process.

    Usage, around everything from placing the hold to settling or releasing it::

        with tracker.track():
            hold = await meter.admit(...)
            ...
    """

    def __init__(self) -> None:
        self._count = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._draining = False

    @property
    def count(self) -> int:
        return self._count

    @property
    def draining(self) -> bool:
        """True once :meth:`drain` has been called: the process is going away."""
        return self._draining

    def _enter(self) -> None:
        self._count += 1
        self._idle.clear()

    def _exit(self) -> None:
        self._count -= 1
        if self._count == 0:
            self._idle.set()

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Count the block as in flight."""
        self._enter()
        try:
            yield
        finally:
            self._exit()

    async def shield(self, work: Awaitable[T]) -> T:
        """Await ``work`` shielded from cancellation, counted as in flight until it is done.

        For the settle/release after fal answered: if the request is cancelled meanwhile (the
        client went away, or shutdown's grace ran out), ``work`` still completes, and
        :meth:`drain` waits for it, so the Redis client is not closed under it.
        """
        task = asyncio.ensure_future(work)
        self._enter()
        task.add_done_callback(lambda _: self._exit())
        return await asyncio.shield(task)

    async def drain(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` seconds for in-flight work to finish; True if it did."""
        self._draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True
