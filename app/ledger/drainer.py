"""Move ledger entries from the per-key Redis streams into the SQL archive, exactly once, and
trim what is archived and older than the retention window from Redis.

Exactly once: an entry's primary key is (key id, stream id) and it is inserted with
insert-or-ignore, in the same SQL transaction that advances the key's progress
(``ledger_progress``). A drainer killed at any point leaves either the whole batch and its
progress, or neither; the next run starts again from the committed progress, and anything it
offers twice is ignored.

Trimming: ``XTRIM <stream> MINID <id>`` with ``id`` = the smaller of "just after the last
archived entry" (committed progress) and "the retention cutoff" (Redis ``TIME`` minus
``FALGATE_LEDGER_REDIS_RETENTION_H``). MINID removes only entries whose id is below it, so an
entry not yet archived is never trimmed, whatever else runs.

One drainer is active at a time across every gateway process: a Redis lease
(``falgate:ledger:drainer``, ``lease.lua``). The archive's identity is recorded in Redis
(``falgate:ledger:archive``): a process configured with a *different* archive database does not
drain (and says so in the log), so one Redis is never split over two archives.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from app.errors import FalgateError
from app.ledger.database import LedgerDatabase, Progress, decoded, parse_entry_id
from app.metering import keyspace
from app.metering.lua import LuaScript, text

log = logging.getLogger("falgate.ledger.drainer")

LEASE_KEY = "falgate:ledger:drainer"
ARCHIVE_KEY = "falgate:ledger:archive"
_KEYS_PER_ROUND_TRIP = 256
_ENTRIES_PER_ROUND_TRIP = 4000
_STOP_TIMEOUT_S = 10.0

Entries = list[tuple[str, dict[str, str]]]


class ArchiveMismatch(FalgateError):
    """This process's archive database is not the one this Redis is archived into."""


@dataclass
class DrainReport:
    archived: int = 0
    trimmed: int = 0
    keys: int = 0
    caught_up: bool = False
    per_key: dict[str, int] = field(default_factory=dict)


class DrainerLease:
    """The single-drainer lease (see ``lease.lua``)."""

    def __init__(self, redis: Any, holder: str, lease_ms: int) -> None:
        self.redis = redis
        self.token = f"{holder}:{secrets.token_hex(6)}"
        self.lease_ms = lease_ms
        self._script = LuaScript(redis, __package__, "lease.lua")

    async def _run(self, mode: str) -> bool:
        return bool(int(text(await self._script([LEASE_KEY], [mode, self.token, self.lease_ms]))))

    async def take(self) -> bool:
        """Take the lease, or extend it when this holder has it."""
        return await self._run("take")

    async def renew(self) -> bool:
        return await self._run("renew")

    async def release(self) -> None:
        await self._run("release")


def _entries(raw: Any) -> Entries:
    """Stream entries as ``(id, fields)`` (the client decodes replies to ``str``)."""
    return [(i if isinstance(i, str) else text(i), dict(decoded(f))) for i, f in raw or []]


def _after(progress: Progress | None) -> str:
    return "-" if progress is None else "(" + progress.entry_id


class Drainer:
    """Archive the ledger into ``database``; ``run()`` is the gateway's background loop."""

    def __init__(
        self,
        redis: Any,
        database: LedgerDatabase,
        *,
        holder: str,
        retention_ms: int,
        batch_size: int = 2000,
        interval_s: float = 5.0,
        lease_ms: int = 30_000,
        after_drain: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        self.redis = redis
        self.database = database
        self.retention_ms = retention_ms
        self.batch_size = max(1, batch_size)
        self.interval_s = interval_s
        self.lease = DrainerLease(redis, holder, lease_ms)
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        self._archive_id: str | None = None
        self._after_drain = after_drain
        self._warned = False

    # --- one pass ------------------------------------------------------------------------

    async def _check_archive(self) -> None:
        """Refuse to drain this Redis into a second, different archive."""
        if self._archive_id is None:
            await asyncio.to_thread(self.database.ensure_migrated)
            self._archive_id = await asyncio.to_thread(self.database.archive_id)
        await self.redis.set(ARCHIVE_KEY, self._archive_id, nx=True)
        recorded = text(await self.redis.get(ARCHIVE_KEY))
        if recorded != self._archive_id:
            raise ArchiveMismatch(
                f"this Redis is archived into another ledger database (archive {recorded}); "
                f"this process's FALGATE_LEDGER_DATABASE_URL is archive {self._archive_id}. "
                "Point every gateway at the same archive database."
            )

    async def _key_ids(self) -> list[str]:
        return sorted({text(k) async for k in self.redis.sscan_iter(keyspace.KEY_IDS, count=1000)})

    async def _read(
        self, key_ids: Sequence[str], progress: Mapping[str, Progress], count: int
    ) -> dict[str, Entries]:
        """The next ``count`` unarchived entries of each key (one round trip per chunk)."""
        found: dict[str, Entries] = {}
        # Bounded replies: a round trip carries at most ~_ENTRIES_PER_ROUND_TRIP entries.
        keys_per_trip = max(1, min(_KEYS_PER_ROUND_TRIP, _ENTRIES_PER_ROUND_TRIP // count))
        for start in range(0, len(key_ids), keys_per_trip):
            chunk = key_ids[start : start + keys_per_trip]
            async with self.redis.pipeline(transaction=False) as pipe:
                for key_id in chunk:
                    pipe.xrange(keyspace.ledger(key_id), _after(progress.get(key_id)), "+", count)
                replies = await pipe.execute()
            for key_id, reply in zip(chunk, replies, strict=True):
                if reply:
                    found[key_id] = _entries(reply)
        return found

    async def drain_once(self) -> DrainReport:
        """Archive everything unarchived now (in transactions of about ``batch_size``
        entries), then trim. The caller holds the lease; a lost lease stops the pass."""
        await self._check_archive()
        report = DrainReport()
        key_ids = await self._key_ids()
        report.keys = len(key_ids)
        progress = await asyncio.to_thread(self.database.progress)  # committed
        read_from = dict(progress)  # read ahead of the commits
        per_key = max(1, min(self.batch_size, 500))
        pending = list(key_ids)
        committing: asyncio.Task[None] | None = None

        async def commit(batch: dict[str, Entries]) -> None:
            # One transaction at a time, in order; the next batch is read from Redis while
            # the previous one is written to SQL.
            nonlocal committing
            if committing is not None:
                await committing
            committing = asyncio.create_task(self._commit(batch, progress, report))

        try:
            while pending:
                found = await self._read(pending, read_from, per_key)
                pending = [k for k, entries in found.items() if len(entries) >= per_key]
                batch: dict[str, Entries] = {}
                size = 0
                for key_id, entries in found.items():
                    read_from[key_id] = Progress(*parse_entry_id(entries[-1][0]))
                    batch[key_id] = entries
                    size += len(entries)
                    if size >= self.batch_size:
                        await commit(batch)
                        batch, size = {}, 0
                if batch:
                    await commit(batch)
            if committing is not None:
                await committing
        finally:
            if committing is not None and not committing.done():
                committing.cancel()
        report.trimmed = await self.trim(progress)
        report.caught_up = True
        if self._after_drain is not None:
            await self._after_drain()  # e.g. the one-time rollup backfill of new keys
        return report

    async def _commit(
        self, batch: dict[str, Entries], progress: dict[str, Progress], report: DrainReport
    ) -> None:
        if not await self.lease.renew():
            raise ArchiveMismatch("the drainer lease was lost; another drainer took over")
        report.archived += await asyncio.to_thread(self.database.archive, batch)
        for key_id, entries in batch.items():
            progress[key_id] = Progress(*parse_entry_id(entries[-1][0]))
            report.per_key[key_id] = report.per_key.get(key_id, 0) + len(entries)

    async def trim(self, progress: Mapping[str, Progress]) -> int:
        """Trim each key's stream to what is archived AND older than the retention window."""
        seconds, micros = await self.redis.time()
        cutoff_ms = int(seconds) * 1000 + int(micros) // 1000 - self.retention_ms
        trimmed = 0
        keys = sorted(progress)
        for start in range(0, len(keys), _KEYS_PER_ROUND_TRIP):
            chunk = keys[start : start + _KEYS_PER_ROUND_TRIP]
            async with self.redis.pipeline(transaction=False) as pipe:
                for key_id in chunk:
                    done = progress[key_id]
                    # Below MINID is trimmed: the next id after the last archived one, or the
                    # cutoff, whichever is lower.
                    archived_below = (done.ms, done.seq + 1)
                    threshold = min(archived_below, (cutoff_ms, 0))
                    pipe.xtrim(
                        keyspace.ledger(key_id),
                        minid=f"{threshold[0]}-{threshold[1]}",
                        approximate=False,
                    )
                trimmed += sum(int(n) for n in await pipe.execute())
        return trimmed

    async def drain(self, *, wait_s: float = 0.0) -> DrainReport:
        """Take the lease (waiting up to ``wait_s`` for another holder to let go), drain once,
        give the lease back (``falgate ledger drain``)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while not await self.lease.take():
            if loop.time() >= deadline:
                raise ArchiveMismatch("another drainer holds the lease; try again later")
            await asyncio.sleep(0.2)
        try:
            return await self.drain_once()
        finally:
            with contextlib.suppress(Exception):
                await self.lease.release()

    # --- background loop -----------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="ledger-drainer")

    async def run(self) -> None:
        while not self._stopped:
            try:
                if await self.lease.take():
                    report = await self.drain_once()
                    if report.archived or report.trimmed:
                        log.info(
                            "ledger drained",
                            extra={"archived": report.archived, "trimmed": report.trimmed},
                        )
            except asyncio.CancelledError:
                raise
            except ArchiveMismatch as exc:
                if not self._warned:
                    log.error("ledger drainer: %s", exc.message)
                    self._warned = True
            except Exception:  # the loop must outlive a Redis or database outage
                log.warning("ledger drain failed; retrying", exc_info=True)
            await asyncio.sleep(self.interval_s)

    async def stop(self) -> None:
        self._stopped = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task}, timeout=_STOP_TIMEOUT_S)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.lease.release(), _STOP_TIMEOUT_S)
