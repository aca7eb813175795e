"""Usage reports and exports, built from the append-only ledger (one Redis Stream per key).

Ledger entries (``{k:<id>}:ledger``, stream ids are Redis server time) have the fields
``event`` (``hold`` | ``settle`` | ``release``), ``key_id``, ``request_id``,
``upstream_request_id``, ``model``, ``operation``, ``pixels``, ``amount_micro`` (hold: held;
settle: charged; release: released), ``released_micro`` (settle), ``hold_micro`` (settle,
release), ``reason``, ``ts_ms``, ``process_id``.

Time filters: ``start`` inclusive, ``end`` exclusive, both UTC.
"""

from __future__ import annotations

import csv
import heapq
import io
import json
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any, Literal

from app.metering import keyspace
from app.metering.lua import store_errors, text
from app.money import format_usd
from app.schemas import parse_rfc3339

GroupBy = Literal["key", "model", "day"]
GROUP_BY: tuple[GroupBy, ...] = ("key", "model", "day")

CSV_COLUMNS = (
    "timestamp",
    "event",
    "key_id",
    "request_id",
    "upstream_request_id",
    "model",
    "operation",
    "megapixels",
    "amount_usd",
    "amount_micro",
    "hold_micro",
    "reason",
    "entry_id",
)


@dataclass(frozen=True)
class LedgerEntry:
    entry_id: str
    event: str
    key_id: str
    request_id: str
    upstream_request_id: str | None
    model: str
    operation: str
    pixels: int
    amount_micro: int
    hold_micro: int | None
    reason: str
    timestamp: datetime

    @classmethod
    def from_stream(cls, entry_id: str, fields: dict[str, str]) -> LedgerEntry:
        hold = fields.get("hold_micro")
        ts_ms = int(fields.get("ts_ms") or entry_id.split("-", 1)[0])
        return cls(
            entry_id=entry_id,
            event=fields.get("event", ""),
            key_id=fields.get("key_id", ""),
            request_id=fields.get("request_id", ""),
            upstream_request_id=fields.get("upstream_request_id") or None,
            model=fields.get("model", ""),
            operation=fields.get("operation", ""),
            pixels=int(fields.get("pixels") or 0),
            amount_micro=int(fields.get("amount_micro") or 0),
            hold_micro=int(hold) if hold else None,
            reason=fields.get("reason", ""),
            timestamp=datetime.fromtimestamp(ts_ms / 1000, UTC),
        )

    @property
    def megapixels(self) -> str:
        return str(Decimal(self.pixels) / 1_000_000)

    def to_json(self) -> dict[str, Any]:
        return {
            "timestamp": self.timestamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "event": self.event,
            "key_id": self.key_id,
            "request_id": self.request_id,
            "upstream_request_id": self.upstream_request_id,
            "model": self.model,
            "operation": self.operation,
            "megapixels": self.megapixels,
            "amount_usd": format_usd(self.amount_micro),
            "amount_micro": self.amount_micro,
            "hold_micro": self.hold_micro,
            "reason": self.reason,
            "entry_id": self.entry_id,
        }


_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_LATEST = datetime.max.replace(tzinfo=UTC)


def parse_moment(value: str | None, *, end: bool = False) -> datetime | None:
    """An RFC 3339 date (``2024-06-01``) or date-time (``2024-06-01T12:00:00Z``, the offset
    required) -> an aware datetime; anything else is a ``ValueError``.

    A bare date as an ``end`` bound includes that whole day.
    """
    if value is None:
        return None
    if _DATE.fullmatch(value):
        moment = datetime.combine(date.fromisoformat(value), time(), UTC)
        if not end:
            return moment
        return moment + timedelta(days=1) if moment.date() < date.max else _LATEST
    return parse_rfc3339(value)


def _ms(moment: datetime) -> int:
    """Milliseconds since the epoch, the ledger's stream ids; nothing is older than 1970."""
    return max(0, int(moment.timestamp() * 1000))


def _stream_order(entry_id: str, index: int) -> tuple[int, int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), index, int(seq or 0)


async def _key_ids(redis: Any, key_ids: Sequence[str] | None) -> list[str]:
    if key_ids is not None:
        return list(key_ids)
    with store_errors():
        return sorted({text(k) async for k in redis.sscan_iter(keyspace.KEY_IDS)})


async def _one_stream(
    redis: Any, key_id: str, start: datetime | None, end: datetime | None, page_size: int
) -> AsyncIterator[LedgerEntry]:
    if end is not None and _ms(end) == 0:
        return  # nothing is older than the epoch
    low = str(_ms(start)) if start else "-"
    high = str(_ms(end) - 1) if end else "+"
    while True:
        with store_errors():
            page = await redis.xrange(keyspace.ledger(key_id), low, high, count=page_size)
        for entry_id, fields in page:
            yield LedgerEntry.from_stream(
                text(entry_id), {text(k): text(v) for k, v in fields.items()}
            )
        if len(page) < page_size:
            return
        low = "(" + text(page[-1][0])


async def iter_ledger(
    redis: Any,
    *,
    key_ids: Sequence[str] | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
    page_size: int = 1000,
) -> AsyncIterator[LedgerEntry]:
    """Ledger entries of the given keys (default: all), merged in time order, page by page."""
    streams = [
        _one_stream(redis, key_id, start, end, page_size)
        for key_id in await _key_ids(redis, key_ids)
    ]
    # Ordered by millisecond, then key, then position in the key's stream (entries of
    # different keys within one millisecond have no order of their own).
    heap: list[tuple[int, int, int, LedgerEntry]] = []
    for index, stream in enumerate(streams):
        first = await anext(stream, None)
        if first is not None:
            heap.append((*_stream_order(first.entry_id, index), first))
    heapq.heapify(heap)
    while heap:
        _, index, _, entry = heap[0]
        yield entry
        following = await anext(streams[index], None)
        if following is None:
            heapq.heappop(heap)
        else:
            heapq.heapreplace(heap, (*_stream_order(following.entry_id, index), following))


@dataclass
class _Totals:
    requests: int = 0
    released: int = 0
    amount_micro: int = 0
    pixels: int = 0


async def usage_report(
    redis: Any,
    *,
    key_ids: Sequence[str] | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
    group_by: GroupBy = "key",
) -> dict[str, Any]:
    """Settled spend grouped by key, model or UTC day.

    Each row: the group value, ``requests`` (settled), ``released`` (requests that failed or
    were cancelled, charged nothing), ``amount_usd`` (settled total), ``megapixels``.
    """
    if group_by not in GROUP_BY:
        raise ValueError(f"group_by must be one of {', '.join(GROUP_BY)}")
    groups: dict[str, _Totals] = {}
    total = _Totals()
    async for entry in iter_ledger(redis, key_ids=key_ids, start=start, end=end):
        if entry.event not in ("settle", "release"):
            continue
        if group_by == "key":
            name = entry.key_id
        elif group_by == "model":
            name = entry.model
        else:
            name = entry.timestamp.date().isoformat()
        for totals in (groups.setdefault(name, _Totals()), total):
            if entry.event == "settle":
                totals.requests += 1
                totals.amount_micro += entry.amount_micro
                totals.pixels += entry.pixels
            else:
                totals.released += 1

    def row(totals: _Totals) -> dict[str, Any]:
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
        "rows": [{group_by: name, **row(groups[name])} for name in sorted(groups)],
        "total": row(total),
    }


async def export_jsonl(entries: AsyncIterator[LedgerEntry]) -> AsyncIterator[str]:
    """One JSON object per line."""
    async for entry in entries:
        yield json.dumps(entry.to_json()) + "\n"


async def export_csv(entries: AsyncIterator[LedgerEntry]) -> AsyncIterator[str]:
    """A header line, then one row per entry."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    async for entry in entries:
        data = entry.to_json()
        writer.writerow(["" if data[c] is None else data[c] for c in CSV_COLUMNS])
        if buffer.tell() > 64_000:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()
