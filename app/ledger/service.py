"""The ledger at rest, as the routes and the command line use it: export, usage, drain."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any, Literal

import sqlalchemy.exc

from app.errors import Unavailable
from app.ledger.database import (
    ROW_COLUMNS,
    LedgerDatabase,
    Progress,
    Row,
    database_url,
    decoded,
    parse_entry_id,
    row_from_stream,
)
from app.ledger.drainer import ARCHIVE_KEY, Drainer
from app.ledger.export import (
    ExportQuery,
    Format,
    LedgerEntry,
    format_chunks,
    in_thread,
    loop_bridge,
    merged_rows,
)
from app.ledger.rollups import GroupKey, RollupPart, Rollups, month_of, months_between
from app.metering import keyspace
from app.metering.lua import store_errors, text
from app.money import format_usd
from app.ops.holds import publish_holds_snapshot
from app.settings import Settings


@contextlib.contextmanager
def archive_errors() -> Iterator[None]:
    """An unreachable archive database is a 503, with the cause kept."""
    try:
        yield
    except sqlalchemy.exc.OperationalError as exc:
        raise Unavailable(
            "The ledger archive database is unavailable; try again shortly.",
            headers={"Retry-After": "1"},
        ) from exc


class LedgerService:
    """Reads and maintains the archive for one gateway (or one ``falgate`` command)."""

    def __init__(self, redis: Any, database: LedgerDatabase, settings: Settings) -> None:
        self.redis = redis
        self.database = database
        self.settings = settings
        self.rollups = Rollups(redis)
        self._archive_id: str | None = None

    @classmethod
    def from_settings(cls, redis: Any, settings: Settings) -> LedgerService:
        url = database_url(settings.ledger_database_url, settings.data_dir)
        return cls(redis, LedgerDatabase(url), settings)

    async def migrate(self) -> list[int]:
        with archive_errors():
            return await asyncio.to_thread(self.database.migrate)

    def close(self) -> None:
        self.database.close()

    def drainer(self, holder: str) -> Drainer:
        s = self.settings
        return Drainer(
            self.redis,
            self.database,
            holder=holder,
            retention_ms=int(s.ledger_redis_retention_h * 3_600_000),
            batch_size=s.ledger_drain_batch,
            interval_s=s.ledger_drain_interval_s,
            lease_ms=int(s.ledger_drain_lease_s * 1000),
            after_drain=self.after_drain,
        )

    async def _key_ids(self, key_id: str | None) -> list[str]:
        if key_id is not None:
            return [key_id]
        with store_errors("The ledger"):
            return sorted({text(k) async for k in self.redis.sscan_iter(keyspace.KEY_IDS)})

    async def _snapshot(self, key_id: str | None) -> tuple[list[str], dict[str, Progress]]:
        key_ids = await self._key_ids(key_id)
        with archive_errors():
            await asyncio.to_thread(self.database.ensure_migrated)
            if self._archive_id is None:
                self._archive_id = await asyncio.to_thread(self.database.archive_id)
            progress = await asyncio.to_thread(self.database.progress)
        with store_errors("The ledger"):
            recorded = await self.redis.get(ARCHIVE_KEY)
        if recorded is not None and text(recorded) != self._archive_id:
            # Entries trimmed from Redis live in the other archive: an answer from this one
            # would silently miss them.
            raise Unavailable(
                "This gateway's ledger archive is not the one this Redis is archived into: "
                "set the same FALGATE_LEDGER_DATABASE_URL on every gateway process."
            )
        return key_ids, progress

    async def export(self, query: ExportQuery, fmt: Format) -> AsyncIterator[bytes]:
        """The selected entries as chunks of JSON lines or CSV.

        The first chunk is produced before this returns, so a Redis or database outage is an
        ``Unavailable`` (503) rather than a response cut short.
        """
        rows = await self._rows(query)
        chunks = in_thread(format_chunks(rows, fmt))
        with store_errors("The ledger"), archive_errors():
            first = await anext(chunks, None)

        async def stream() -> AsyncIterator[bytes]:
            if first is not None:
                yield first
            async for chunk in chunks:
                yield chunk

        return stream()

    async def recompute_usage(self, query: ExportQuery) -> dict[GroupKey, Totals]:
        """Settled/released totals per (key, UTC day, model, operation), from every raw entry
        (archive + tail) - O(entries), in a worker thread. The rollups must equal this."""
        rows = await self._rows(query)
        with store_errors("The ledger"), archive_errors():
            return await asyncio.to_thread(totals_of, rows)

    async def _rows(self, query: ExportQuery) -> Iterator[Row]:
        """The selected entries, archive then tail, in ledger order (read in a worker thread)."""
        key_ids, progress = await self._snapshot(query.key_id)
        return merged_rows(
            self.database,
            self.redis,
            loop_bridge(asyncio.get_running_loop()),
            key_ids=key_ids,
            progress=progress,
            query=query,
        )

    async def usage(
        self,
        *,
        key_id: str | None,
        start: datetime | None,
        end: datetime | None,
        group_by: GroupBy,
    ) -> dict[str, Any]:
        """Settled spend grouped by key, model or UTC day (``/admin/usage``)."""
        groups = await self.groups(key_id=key_id, start=start, end=end, view=group_by)
        return shape_report(groups, group_by=group_by, start=start, end=end)

    async def groups(
        self,
        *,
        key_id: str | None,
        start: datetime | None,
        end: datetime | None,
        view: View,
    ) -> dict[GroupKey, Totals]:
        """Totals per (key, day, model, operation) group of ``[start, end)``, as fine as
        ``view`` needs: ``key``/``model`` may merge days (whole months), ``day`` may merge
        models, ``day_model`` keeps day and model.

        Whole UTC days come from the rollups (O(keys x months of the window)); a window edge
        inside a day, and a key whose rollups are not backfilled yet, are recomputed from
        the raw ledger (O(entries of that part only)).
        """
        key_ids = await self._key_ids(key_id)
        with store_errors("The ledger"):
            states = await self.rollups.states(key_ids)
        ready = [k for k in key_ids if states[k].backfilled]
        pending = [k for k in key_ids if not states[k].backfilled]
        groups: dict[GroupKey, Totals] = {}

        def add(found: dict[GroupKey, Totals], keys: set[str] | None = None) -> None:
            for group, totals in found.items():
                if keys is None or group[0] in keys:
                    groups.setdefault(group, Totals()).add(totals)

        first_day, last_day = _whole_days(start, end)
        whole_days = first_day is None or last_day is None or first_day <= last_day
        firsts = [first for k in ready if (first := states[k].first)]
        if whole_days and firsts:
            low = max(month_of(first_day), min(firsts)) if first_day else min(firsts)
            high = month_of(last_day) if last_day else _next_month(datetime.now(UTC).date())
            parts = _rollup_parts(months_between(low, high), first_day, last_day, view)
            with store_errors("The ledger"):
                raw = await self.rollups.read(ready, parts)
            add({g: Totals.from_metrics(m) for g, m in raw.items()})
        if ready:
            ready_set = set(ready)
            for low_ms, high_ms in _partial_ranges(start, end, first_day, last_day):
                query = ExportQuery(key_id=key_id, start_ms=low_ms, end_ms=high_ms)
                add(await self.recompute_usage(query), ready_set)
        for pending_key in pending:
            query = ExportQuery(key_id=pending_key, start_ms=_ms(start), end_ms=_ms(end))
            add(await self.recompute_usage(query))
        return groups

    async def recent(self, key_id: str, limit: int = 50) -> list[LedgerEntry]:
        """The key's newest ledger entries (archive and Redis tail), newest first."""
        with store_errors("The ledger"):
            page = await self.redis.xrevrange(keyspace.ledger(key_id), count=limit)
        with archive_errors():
            await asyncio.to_thread(self.database.ensure_migrated)
            archived = await asyncio.to_thread(self.database.latest, key_id, limit)
        rows = {(r[0], r[2]): r for r in archived}
        for entry_id, fields in page:
            row = row_from_stream(key_id, text(entry_id), decoded(fields))[: len(ROW_COLUMNS)]
            rows[(row[0], row[2])] = row
        newest = sorted(rows, reverse=True)[:limit]
        return [LedgerEntry.from_row(rows[position]) for position in newest]

    async def after_drain(self) -> None:
        """What the single active drainer also does each cycle: backfill new keys' rollups and
        publish the holds snapshot ``/metrics`` reads."""
        await self.backfill_rollups()
        with store_errors("The ledger"):
            await publish_holds_snapshot(self.redis)

    async def backfill_rollups(self) -> int:
        """Count, once, the ledger entries written before the scripts kept rollups (idempotent:
        a key is backfilled at most once, whatever runs concurrently). Returns keys done."""
        key_ids = await self._key_ids(None)
        with store_errors("The ledger"):
            states = await self.rollups.states(key_ids)
        done = 0
        for key_id in key_ids:
            if states[key_id].backfilled:
                continue
            with store_errors("The ledger"):
                since, backfilled = await self.rollups.mark(key_id)
            if backfilled:
                continue
            ms, seq = parse_entry_id(since)
            query = ExportQuery(key_id=key_id, end_ms=ms + 1, before=(ms, seq))
            found = await self.recompute_usage(query)
            totals = [(g[1], g[2], g[3], t.metrics()) for g, t in found.items()]
            with store_errors("The ledger"):
                if await self.rollups.apply(key_id, since, totals):
                    done += 1
        return done


# --- usage recomputed from the raw ledger --------------------------------------------------


@dataclass
class Totals:
    """One group's totals: settled requests, released requests, pixels and micro-dollars."""

    requests: int = 0
    released: int = 0
    images: int = 0
    pixels: int = 0
    amount_micro: int = 0

    @classmethod
    def from_metrics(cls, metrics: dict[str, int]) -> Totals:
        return cls(
            requests=metrics.get("requests", 0),
            released=metrics.get("released", 0),
            images=metrics.get("images", 0),
            pixels=metrics.get("pixels", 0),
            amount_micro=metrics.get("micro", 0),
        )

    def metrics(self) -> dict[str, int]:
        """As the rollup hashes name them."""
        return {
            "requests": self.requests,
            "released": self.released,
            "images": self.images,
            "pixels": self.pixels,
            "micro": self.amount_micro,
        }

    def add(self, other: Totals) -> None:
        self.requests += other.requests
        self.released += other.released
        self.images += other.images
        self.pixels += other.pixels
        self.amount_micro += other.amount_micro


def utc_day(ms: int) -> str:
    return datetime.fromtimestamp(ms // 1000, UTC).date().isoformat()


def totals_of(rows: Iterator[Row]) -> dict[GroupKey, Totals]:
    """(key, day of the entry, model, operation) -> totals of its settles and releases."""
    groups: dict[GroupKey, Totals] = {}
    for row in rows:
        event = row[4]
        if event not in ("settle", "release"):
            continue
        group = (row[1], utc_day(row[14]), row[7], row[8])
        totals = groups.get(group)
        if totals is None:
            totals = groups[group] = Totals()
        if event == "settle":
            totals.requests += 1
            totals.images += row[16] or 0
            totals.pixels += row[9]
            totals.amount_micro += row[10]
        else:
            totals.released += 1
    return groups


ONE_DAY = timedelta(days=1)
GroupBy = Literal["key", "model", "day"]
View = Literal["key", "model", "day", "day_model"]
_GROUP_INDEX = {"key": 0, "day": 1, "model": 2}


def shape_report(
    groups: dict[GroupKey, Totals],
    *,
    group_by: GroupBy,
    start: datetime | None,
    end: datetime | None,
) -> dict[str, Any]:
    """The ``/admin/usage`` body from (key, day, model, operation) totals."""
    index = _GROUP_INDEX[group_by]
    rows: dict[str, Totals] = {}
    total = Totals()
    for group, totals in groups.items():
        rows.setdefault(group[index], Totals()).add(totals)
        total.add(totals)

    def row(totals: Totals) -> dict[str, Any]:
        return {
            "requests": totals.requests,
            "released": totals.released,
            "images": totals.images,
            "amount_usd": format_usd(totals.amount_micro),
            "megapixels": str(Decimal(totals.pixels) / 1_000_000),
        }

    return {
        "group_by": group_by,
        "from": start.isoformat() if start else None,
        "to": end.isoformat() if end else None,
        "rows": [{group_by: name, **row(rows[name])} for name in sorted(rows)],
        "total": row(total),
    }


def _ms(moment: datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp() * 1000)


def _midnight(day: date) -> datetime:
    return datetime.combine(day, time(), UTC)


def _whole_days(start: datetime | None, end: datetime | None) -> tuple[date | None, date | None]:
    """The first and last UTC day lying wholly inside ``[start, end)`` (None: unbounded)."""
    first = None
    if start is not None:
        start = start.astimezone(UTC)
        first = start.date() if start == _midnight(start.date()) else start.date() + ONE_DAY
    last = None
    if end is not None:
        end = end.astimezone(UTC)
        last = end.date() - ONE_DAY
    return first, last


def _partial_ranges(
    start: datetime | None, end: datetime | None, first: date | None, last: date | None
) -> list[tuple[int | None, int | None]]:
    """The parts of ``[start, end)`` outside its whole days, as ms ranges."""
    if first is not None and last is not None and first > last:
        return [(_ms(start), _ms(end))]  # inside one day (or across a single midnight)
    ranges: list[tuple[int | None, int | None]] = []
    if start is not None and first is not None and _midnight(first) > start:
        ranges.append((_ms(start), _ms(_midnight(first))))
    if end is not None and last is not None and _midnight(last + ONE_DAY) < end:
        ranges.append((_ms(_midnight(last + ONE_DAY)), _ms(end)))
    return ranges


def _rollup_parts(
    months: list[str], first: date | None, last: date | None, group_by: View
) -> list[RollupPart]:
    """The smallest rollup view of each month that answers ``group_by`` for the whole days
    ``first..last``: a whole month by key or model from its month totals, a day grouping (or
    a key's part of a month) from the by-day view, a model's part of a month from the detail."""
    low = first.isoformat() if first else "0000-00-00"
    high = last.isoformat() if last else "9999-99-99"
    parts = []
    for month in months:
        whole = low <= f"{month}-01" and _month_end(month) <= high
        if whole and group_by in ("key", "model"):
            parts.append(RollupPart(month, "m"))
        elif group_by in ("model", "day_model"):
            parts.append(RollupPart(month, "", low, high))
        else:
            parts.append(RollupPart(month, "d", low, high))
    return parts


def _month_end(month: str) -> str:
    year, number = int(month[:4]), int(month[5:7])
    following = date(year + number // 12, number % 12 + 1, 1)
    return (following - ONE_DAY).isoformat()


def _next_month(day: date) -> str:
    return month_of(date(day.year + day.month // 12, day.month % 12 + 1, 1))
