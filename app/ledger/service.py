"""The ledger at rest, as the routes and the command line use it: export, usage, drain."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal

import sqlalchemy.exc

from app.errors import Unavailable
from app.ledger.database import LedgerDatabase, Progress, Row, database_url
from app.ledger.drainer import Drainer
from app.ledger.export import (
    ExportQuery,
    Format,
    format_chunks,
    in_thread,
    loop_bridge,
    merged_rows,
)
from app.metering import keyspace
from app.metering.lua import store_errors, text
from app.money import format_usd
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
        )

    async def _key_ids(self, key_id: str | None) -> list[str]:
        if key_id is not None:
            return [key_id]
        with store_errors("The ledger"):
            return sorted({text(k) async for k in self.redis.sscan_iter(keyspace.KEY_IDS)})

    async def _snapshot(self, key_id: str | None) -> tuple[list[str], dict[str, Progress]]:
        key_ids = await self._key_ids(key_id)
        with archive_errors():
            progress = await asyncio.to_thread(self.database.progress)
        return key_ids, progress

    async def export(self, query: ExportQuery, fmt: Format) -> AsyncIterator[bytes]:
        """The selected entries as chunks of JSON lines or CSV.

        The first chunk is produced before this returns, so a Redis or database outage is an
        ``Unavailable`` (503) rather than a response cut short.
        """
        key_ids, progress = await self._snapshot(query.key_id)
        rows = merged_rows(
            self.database,
            self.redis,
            loop_bridge(asyncio.get_running_loop()),
            key_ids=key_ids,
            progress=progress,
            query=query,
        )
        chunks = in_thread(format_chunks(rows, fmt))
        with store_errors("The ledger"), archive_errors():
            first = await anext(chunks, None)

        async def stream() -> AsyncIterator[bytes]:
            if first is not None:
                yield first
            async for chunk in chunks:
                yield chunk

        return stream()

    async def recompute_usage(self, query: ExportQuery) -> dict[tuple[str, str, str, str], Totals]:
        """Settled/released totals per (key, UTC day, model, operation), from every raw entry
        (archive + tail) - O(entries), in a worker thread. The rollups must equal this."""
        key_ids, progress = await self._snapshot(query.key_id)
        rows = merged_rows(
            self.database,
            self.redis,
            loop_bridge(asyncio.get_running_loop()),
            key_ids=key_ids,
            progress=progress,
            query=query,
        )
        with store_errors("The ledger"), archive_errors():
            return await asyncio.to_thread(totals_of, rows)

    async def usage(
        self,
        *,
        key_id: str | None,
        start: datetime | None,
        end: datetime | None,
        group_by: GroupBy,
    ) -> dict[str, Any]:
        """Settled spend grouped by key, model or UTC day (``/admin/usage``)."""
        query = ExportQuery(
            key_id=key_id,
            start_ms=int(start.timestamp() * 1000) if start else None,
            end_ms=int(end.timestamp() * 1000) if end else None,
        )
        groups = await self.recompute_usage(query)
        return shape_report(groups, group_by=group_by, start=start, end=end)


# --- usage recomputed from the raw ledger --------------------------------------------------


@dataclass
class Totals:
    """One group's totals: settled requests, released requests, pixels and micro-dollars."""

    requests: int = 0
    released: int = 0
    pixels: int = 0
    amount_micro: int = 0

    def add(self, other: Totals) -> None:
        self.requests += other.requests
        self.released += other.released
        self.pixels += other.pixels
        self.amount_micro += other.amount_micro


def utc_day(ms: int) -> str:
    return datetime.fromtimestamp(ms // 1000, UTC).date().isoformat()


def totals_of(rows: Iterator[Row]) -> dict[tuple[str, str, str, str], Totals]:
    """(key, day of the entry, model, operation) -> totals of its settles and releases."""
    groups: dict[tuple[str, str, str, str], Totals] = {}
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
            totals.pixels += row[9]
            totals.amount_micro += row[10]
        else:
            totals.released += 1
    return groups


GroupBy = Literal["key", "model", "day"]
_GROUP_INDEX = {"key": 0, "day": 1, "model": 2}


def shape_report(
    groups: dict[tuple[str, str, str, str], Totals],
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
