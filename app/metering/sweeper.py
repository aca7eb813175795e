"""Resolve the holds of crashed gateway processes, and free their in-flight slots.

Every gateway process keeps a lease ``falgate:proc:<process id>`` (TTL
``FALGATE_PROCESS_LEASE_S``, renewed several times per lease). Holds and in-flight slots
record the process that placed them. Every ``FALGATE_SWEEPER_INTERVAL_S`` each process's sweeper
looks for holds whose process has no lease any more, claims each one (``claim.lua``) and:

- fal's request id is unknown (the process died before fal accepted the job) -> release;
- fal says the job is still queued or running -> leave it for a later sweep;
- fal says it completed -> settle from the sizes of the images fal returned (at the hold amount
  when an image lacks its size, as upscalers' results do);
- fal says it failed, or does not know it -> release.

Holds of live processes are treated the same way once they are older than any request can
live (queue timeout + request timeout + a lease + a minute): their settle or release was lost,
e.g. because Redis was unreachable at that moment. After this process could not reach Redis,
it waits a full lease before sweeping, so live processes have renewed their leases first.

Any number of processes may sweep at once: the claim keeps them from duplicating work, and
``resolve.lua`` acts only while the hold exists, so nothing is resolved twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from app.catalog.pricing import price_images
from app.errors import FalgateError, Unavailable
from app.metering import keyspace
from app.metering.lua import LuaScript, store_errors, text
from app.metering.meter import Meter
from app.settings import Settings
from app.upstream.types import OutcomeState, UpstreamOutcome

log = logging.getLogger("falgate.sweeper")

_BATCH = 200
_STOP_TIMEOUT_S = 5.0


class OutcomeSource(Protocol):
    """What the sweeper needs from the fal client."""

    async def outcome(self, endpoint: str, request_id: str) -> UpstreamOutcome: ...


@dataclass
class SweepReport:
    settled: list[str] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    slots_freed: int = 0


class Sweeper:
    """This process's lease heartbeat plus the loop that resolves dead processes' holds."""

    def __init__(
        self, redis: Any, settings: Settings, process_id: str, upstream: OutcomeSource
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.process_id = process_id
        self.upstream = upstream
        self.meter = Meter(redis, settings, process_id)
        self.lease_ms = max(1000, int(settings.process_lease_s * 1000))
        # No request lives longer than this: a hold this old is orphaned even if its process
        # is alive (e.g. its settle failed while Redis was unreachable).
        self.max_hold_age_ms = int(
            (
                settings.upstream_queue_timeout_s
                + settings.upstream_request_timeout_s
                + settings.process_lease_s
                + 60
            )
            * 1000
        )
        self._claim = LuaScript(redis, __package__, "claim.lua")
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    # --- lease -------------------------------------------------------------------------

    async def heartbeat(self) -> None:
        """Renew this process's lease (it is alive while the key exists)."""
        with store_errors("The metering store"):
            await self.redis.set(keyspace.process_lease(self.process_id), "1", px=self.lease_ms)

    async def start(self) -> None:
        """Take the lease and start the background loop (the app lifespan calls this)."""
        try:
            await self.heartbeat()
        except Unavailable:
            log.warning("Redis unreachable at startup; the sweeper will keep trying")
        self._task = asyncio.create_task(self.run(), name=f"sweeper-{self.process_id}")

    async def stop(self) -> None:
        """Stop the loop and give up the lease, so others resolve anything left at once."""
        self._stopped = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # Bounded: a cancellation swallowed somewhere below (a library turning it into a
            # timeout) must not hang shutdown; the loop also checks ``_stopped``.
            done, _ = await asyncio.wait({task}, timeout=_STOP_TIMEOUT_S)
            if not done:
                log.warning("the sweeper loop did not stop within %ss", _STOP_TIMEOUT_S)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                self.redis.delete(keyspace.process_lease(self.process_id)), _STOP_TIMEOUT_S
            )

    async def run(self) -> None:
        """Heartbeat every third of a lease; sweep every ``sweeper_interval_s`` (jittered)."""
        loop = asyncio.get_running_loop()
        beat_every = self.lease_ms / 3000
        next_sweep = loop.time() + self.settings.sweeper_interval_s * random.random()
        # After Redis was unreachable every lease may have run out, live processes' too: give
        # them a full lease to renew before treating anyone as dead.
        sweep_not_before = loop.time()
        while not self._stopped:
            try:
                try:
                    await self.heartbeat()
                except Unavailable:
                    sweep_not_before = loop.time() + self.lease_ms / 1000
                    raise
                if loop.time() >= max(next_sweep, sweep_not_before):
                    await self.sweep_once()
                    next_sweep = loop.time() + self.settings.sweeper_interval_s * (
                        0.75 + random.random() / 2
                    )
            except asyncio.CancelledError:
                raise
            except Unavailable:
                pass  # Redis down: retry on the next tick
            except Exception:
                log.exception("sweep failed")
            await asyncio.sleep(max(0.01, min(beat_every, next_sweep - loop.time())))

    # --- sweeping ----------------------------------------------------------------------

    async def sweep_once(self) -> SweepReport:
        """One pass over every key's holds and in-flight slots."""
        report = SweepReport()
        with store_errors():
            key_ids = sorted({text(k) async for k in self.redis.sscan_iter(keyspace.KEY_IDS)})
        for start in range(0, len(key_ids), _BATCH):
            await self._sweep_keys(key_ids[start : start + _BATCH], report)
        return report

    async def _sweep_keys(self, key_ids: list[str], report: SweepReport) -> None:
        with store_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                for key_id in key_ids:
                    pipe.hgetall(keyspace.holds(key_id))
                    pipe.hgetall(keyspace.inflight(key_id))
                replies = await pipe.execute()
        holds: dict[str, dict[str, dict[str, str]]] = {}
        slots: dict[str, dict[str, str]] = {}
        for i, key_id in enumerate(key_ids):
            raw_holds, raw_slots = replies[2 * i], replies[2 * i + 1]
            if raw_holds:
                holds[key_id] = {text(k): json.loads(text(v)) for k, v in raw_holds.items()}
            if raw_slots:
                slots[key_id] = {text(k): text(v) for k, v in raw_slots.items()}
        owners = {h["process"] for per_key in holds.values() for h in per_key.values()}
        owners |= {p for per_key in slots.values() for p in per_key.values()}
        dead = await self._dead(owners - {self.process_id})

        stale = [
            (key_id, rid)
            for key_id, per_key in slots.items()
            for rid, process in per_key.items()
            if process in dead
        ]
        if stale:
            with store_errors():
                async with self.redis.pipeline(transaction=False) as pipe:
                    for key_id, rid in stale:
                        pipe.hdel(keyspace.inflight(key_id), rid)
                    report.slots_freed += sum(await pipe.execute())

        too_old = time.time() * 1000 - self.max_hold_age_ms
        for key_id, per_key in holds.items():
            for rid, hold in per_key.items():
                if hold["process"] in dead:
                    await self._resolve_orphan(key_id, rid, hold, self.lease_ms, report)
                elif int(hold["created_ms"]) < too_old:
                    await self._resolve_orphan(key_id, rid, hold, self.max_hold_age_ms, report)

    async def _dead(self, processes: set[str]) -> set[str]:
        if not processes:
            return set()
        ordered = sorted(processes)
        with store_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                for process in ordered:
                    pipe.exists(keyspace.process_lease(process))
                alive = await pipe.execute()
        return {p for p, exists in zip(ordered, alive, strict=True) if not exists}

    async def _unclaim(self, key_id: str, request_id: str, process: str) -> None:
        """Give the claim up so the next sweep (by any process) asks fal again."""
        with store_errors():
            await self._claim(
                [keyspace.holds(key_id)], [request_id, self.process_id, 0, self.lease_ms, process]
            )

    async def _resolve_orphan(
        self,
        key_id: str,
        request_id: str,
        seen: dict[str, str],
        min_age_ms: int,
        report: SweepReport,
    ) -> None:
        process = seen["process"]
        with store_errors():
            raw = await self._claim(
                [keyspace.holds(key_id)],
                [request_id, self.process_id, self.lease_ms, min_age_ms, process],
            )
        if not raw:
            return
        hold = json.loads(text(raw))
        upstream_id = hold.get("upstream") or ""
        if not upstream_id:
            released = await self.meter.resolve_hold(
                key_id, request_id, settle=False, reason="orphaned"
            )
            if not released.already_resolved:
                report.released.append(request_id)
            return
        try:
            outcome = await self.upstream.outcome(hold["endpoint"], upstream_id)
        except FalgateError as exc:
            log.warning("could not ask fal about %s (%s); will retry", upstream_id, exc.message)
            await self._unclaim(key_id, request_id, process)
            report.pending.append(request_id)
            return
        if outcome.state is OutcomeState.PENDING:
            await self._unclaim(key_id, request_id, process)
            report.pending.append(request_id)
            return
        if outcome.state is OutcomeState.COMPLETED:
            amount, pixels = _billed(outcome, int(hold["unit_price"]))
            settlement = await self.meter.resolve_hold(
                key_id, request_id, settle=True, amount=amount, pixels=pixels, reason="swept"
            )
            if not settlement.already_resolved:
                report.settled.append(request_id)
            return
        released = await self.meter.resolve_hold(
            key_id, request_id, settle=False, reason=f"orphaned_{outcome.state.value}"
        )
        if not released.already_resolved:
            report.released.append(request_id)


def _billed(outcome: UpstreamOutcome, unit_price: int) -> tuple[int | None, int | None]:
    """(amount, pixels) to settle a completed job at; ``None`` means "the hold amount".

    Priced from the sizes fal reports; where a size is missing (upscalers omit it) the output
    is the size that was priced, i.e. the hold.
    """
    if outcome.result is None:
        return None, None
    sizes = [(img.width, img.height) for img in outcome.result.images]
    if not all(w and h for w, h in sizes):
        return None, None
    actual = price_images([(w or 0, h or 0) for w, h in sizes], unit_price)
    return actual.amount, actual.pixels
