"""The resolver: settles or releases every hold whose request is no longer alive to do it.

Every open hold has a lease (``{k:<id>}:leases``, Redis clock) that its live request renews
(``app.metering.leases``). Every ``FALGATE_SWEEPER_INTERVAL_S`` each process's resolver takes
the holds whose lease ran out (a crashed process's, or ones the request path marked
``unresolved``), claims each one (``claim.lua``) and:

- fal's request id is unknown (fal never accepted the job, or the process died before it
  could record the id) -> release (``abandoned``; put back if its request is alive after all
  and fal has the job, see ``reinstate.lua``);
- fal says the job is still queued or running -> look again shortly;
- fal says it completed -> settle from the sizes of the images fal returned (at the hold amount
  where an image lacks its size, as upscalers' results do);
- fal says it failed or was cancelled without output, or does not know the id -> release.

Any number of processes may resolve at once: the claim keeps them from duplicating work, and
``resolve.lua`` acts only while the hold exists, so nothing is resolved twice. The process
lease (``falgate:proc:<id>``) that this loop also renews tells idempotent retries whether the
process running a first attempt is alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from dataclasses import dataclass, field
from typing import Any, Protocol

from app.catalog.pricing import price_images
from app.errors import FalgateError, Unavailable
from app.metering import keyspace
from app.metering.lua import LuaScript, store_errors, text
from app.metering.meter import ABANDONED, Meter
from app.settings import Settings
from app.upstream.types import OutcomeState, UpstreamOutcome

log = logging.getLogger("falgate.sweeper")

_BATCH = 200
_FOLLOW_CLAIM_MS = 250  # resolve_one(follow=True): how long its claim keeps others away
_STOP_TIMEOUT_S = 5.0


class OutcomeSource(Protocol):
    """What the sweeper needs from the fal client."""

    async def outcome(self, endpoint: str, request_id: str) -> UpstreamOutcome: ...


@dataclass
class SweepReport:
    settled: list[str] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)


class Sweeper:
    """This process's lease heartbeat plus the loop that resolves abandoned holds."""

    def __init__(
        self, redis: Any, settings: Settings, process_id: str, upstream: OutcomeSource
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.process_id = process_id
        self.upstream = upstream
        self.meter = Meter(redis, settings, process_id)
        self.lease_ms = max(1000, int(settings.process_lease_s * 1000))
        # How long a claim lasts: the time one resolver has to ask fal before another may, and
        # so how soon a job fal is still working on is asked about again (about every sweep).
        self.claim_ms = max(1000, int(settings.sweeper_interval_s * 1000))
        self._claim = LuaScript(redis, __package__, "claim.lua", prelude=("clock.lua",))
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
            log.warning("Redis unreachable at startup; the resolver will keep trying")
        self._task = asyncio.create_task(self.run(), name=f"resolver-{self.process_id}")

    async def stop(self) -> None:
        """Stop the loop and give up the lease."""
        self._stopped = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # Bounded: a cancellation swallowed somewhere below (a library turning it into a
            # timeout) must not hang shutdown; the loop also checks ``_stopped``.
            done, _ = await asyncio.wait({task}, timeout=_STOP_TIMEOUT_S)
            if not done:
                log.warning("the resolver loop did not stop within %ss", _STOP_TIMEOUT_S)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                self.redis.delete(keyspace.process_lease(self.process_id)), _STOP_TIMEOUT_S
            )

    async def run(self) -> None:
        """Heartbeat every third of a lease; resolve every ``sweeper_interval_s`` (jittered)."""
        loop = asyncio.get_running_loop()
        beat_every = self.lease_ms / 3000
        next_sweep = loop.time() + self.settings.sweeper_interval_s * random.random()
        next_beat = loop.time()
        while not self._stopped:
            try:
                if loop.time() >= next_beat:
                    await self.heartbeat()
                    next_beat = loop.time() + beat_every
                if loop.time() >= next_sweep:
                    await self.sweep_once()
                    next_sweep = loop.time() + self.settings.sweeper_interval_s * (
                        0.75 + random.random() / 2
                    )
            except asyncio.CancelledError:
                raise
            except Unavailable:
                pass  # Redis down: retry on the next tick
            except Exception:
                log.exception("resolving holds failed")
            await asyncio.sleep(max(0.01, min(next_beat, next_sweep) - loop.time()))

    # --- resolving ---------------------------------------------------------------------

    async def sweep_once(self) -> SweepReport:
        """One pass: every hold whose lease ran out, on every key."""
        report = SweepReport()
        with store_errors():
            key_ids = sorted({text(k) async for k in self.redis.sscan_iter(keyspace.KEY_IDS)})
        for start in range(0, len(key_ids), _BATCH):
            await self._sweep_keys(key_ids[start : start + _BATCH], report)
        return report

    async def _sweep_keys(self, key_ids: list[str], report: SweepReport) -> None:
        with store_errors():
            seconds, micros = await self.redis.time()
            now_ms = int(seconds) * 1000 + int(micros) // 1000
            async with self.redis.pipeline(transaction=False) as pipe:
                for key_id in key_ids:
                    pipe.zrangebyscore(keyspace.leases(key_id), "-inf", now_ms, 0, _BATCH)
                replies = await pipe.execute()
        for key_id, due in zip(key_ids, replies, strict=True):
            for request_id in due:
                await self._resolve(key_id, text(request_id), report)

    async def resolve_one(
        self, key_id: str, request_id: str, *, follow: bool = False
    ) -> SweepReport:
        """Resolve one hold now if it is due (e.g. its client just asked fal's queue API for
        the result, or cancelled it), instead of waiting for the next sweep.

        ``follow``: for a job handed to the resolver (fal's queue API) that someone is
        watching, ask fal even if another resolver's claim on it has not run out yet, and
        claim it only briefly: a still-pending job is looked at again on the next call, not a
        whole claim later. Resolving stays exactly-once (resolve.lua).
        """
        report = SweepReport()
        await self._resolve(key_id, request_id, report, follow=follow)
        return report

    async def _resolve(
        self, key_id: str, request_id: str, report: SweepReport, *, follow: bool = False
    ) -> None:
        claim: list[str | int | float] = (
            [request_id, _FOLLOW_CLAIM_MS, 1] if follow else [request_id, self.claim_ms, 0]
        )
        with store_errors():
            raw = await self._claim([keyspace.holds(key_id), keyspace.leases(key_id)], claim)
        if not raw:
            return
        hold = json.loads(text(raw))
        upstream_id = hold.get("upstream") or ""
        if not upstream_id:
            released = await self.meter.resolve_hold(
                key_id, request_id, settle=False, reason=ABANDONED
            )
            if not released.already_resolved:
                report.released.append(request_id)
            return
        try:
            outcome = await self.upstream.outcome(hold["endpoint"], upstream_id)
        except FalgateError as exc:
            log.warning("could not ask fal about %s (%s); will retry", upstream_id, exc.message)
            report.pending.append(request_id)
            return
        if outcome.state is OutcomeState.PENDING:
            report.pending.append(request_id)
            return
        if outcome.state is OutcomeState.COMPLETED and outcome.result is not None:
            amount, pixels = _billed(outcome, int(hold["unit_price"]))
            settlement = await self.meter.resolve_hold(
                key_id,
                request_id,
                settle=True,
                amount=amount,
                pixels=pixels,
                reason="resolved",
                images=outcome.result.images,
                seed=outcome.result.seed,
            )
            if not settlement.already_resolved:
                report.settled.append(request_id)
            return
        released = await self.meter.resolve_hold(
            key_id,
            request_id,
            settle=False,
            reason=f"resolved_{outcome.state.value}",
            outcome="cancelled" if outcome.state is OutcomeState.CANCELLED else "failed",
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
