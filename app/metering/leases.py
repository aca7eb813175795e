"""Per-hold leases: a live request keeps its hold (and its upstream slot) alive.

Every open hold has a deadline in ``{k:<id>}:leases``. While the request that placed it is
running, this process renews it, together with the request's upstream slot, every third of a
lease, all of the process's live requests in one Redis round trip (not a task per request).
A hold whose deadline passed belongs to a request that is gone (its process crashed, or it
gave up): the resolver (``app.metering.sweeper``) takes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

from app.errors import Unavailable
from app.metering.lua import ScriptCall, run_together
from app.metering.meter import Meter
from app.ratelimit.upstream_gate import UpstreamGate

log = logging.getLogger("falgate.leases")

_STOP_TIMEOUT_S = 5.0


class LeaseKeeper:
    """Renews the leases of this process's live holds and upstream slots."""

    def __init__(self, meter: Meter, gate: UpstreamGate) -> None:
        self.meter = meter
        self.gate = gate
        self.interval_s = min(meter.lease_ms, gate.lease_ms) / 3000
        self._holds: dict[str, set[str]] = {}
        self._task: asyncio.Task[None] | None = None

    @contextlib.contextmanager
    def keep(self, key_id: str, request_id: str) -> Iterator[None]:
        """Renew this request's hold and upstream slot for the duration of the block."""
        self._holds.setdefault(key_id, set()).add(request_id)
        try:
            yield
        finally:
            ids = self._holds.get(key_id)
            if ids is not None:
                ids.discard(request_id)
                if not ids:
                    del self._holds[key_id]

    def calls(self) -> list[ScriptCall]:
        """The scripts that renew everything live now (one per key, plus one for the slots)."""
        calls = [self.meter.renew_call(key_id, sorted(ids)) for key_id, ids in self._holds.items()]
        slots = sorted(rid for ids in self._holds.values() for rid in ids)
        if slots:
            calls.append(self.gate.renew_call(slots))
        return calls

    async def renew_once(self) -> None:
        calls = self.calls()
        if calls:
            await run_together(self.meter.redis, *calls)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="lease-keeper")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task}, timeout=_STOP_TIMEOUT_S)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.renew_once()
            except Unavailable:
                log.warning("could not renew hold leases: the metering store is unavailable")
            except Exception:
                log.exception("renewing hold leases failed")


__all__ = ["LeaseKeeper"]
