"""The whole ledger in one order: the SQL archive merged with the not-yet-archived Redis tail.

Order: by ``(id_ms, key_id, id_seq)`` - the millisecond of the entry's stream id (Redis server
time of the append), then the key id (byte order), then the sequence within that millisecond.
Within one key this is exactly the key's stream order; across keys it is time order, ties
broken by key id. Every entry has one position, so a cursor (the position of the last entry
a page returned, ``<ms>-<seq>.<key id>``) resumes exactly after it.

What is read: the archive (keyset pages of :meth:`LedgerDatabase.page`) and, for each key, the
Redis stream from just after the archive's progress for that key (a snapshot taken when the
export starts). An entry archived while the export runs may be met in both; the merge emits it
once. The drainer trims only entries older than the retention window, so an export that takes
less than that window is exact.

Memory is flat: the archive is read a page at a time, each key's tail a page at a time. The
merging and formatting run in a worker thread (:func:`stream_chunks`), which asks the event
loop for the Redis pages it needs; the event loop only passes chunks of bytes on.
"""

from __future__ import annotations

import asyncio
import csv
import heapq
import io
import json
import json.encoder
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from operator import itemgetter
from typing import Any, Literal, TypeVar

from app.errors import InvalidRequest
from app.ledger.database import (
    ROW_COLUMNS,
    LedgerDatabase,
    Progress,
    Row,
    decoded,
    row_from_stream,
)
from app.metering import keyspace
from app.metering.lua import text
from app.money import format_usd

T = TypeVar("T")

Format = Literal["jsonl", "csv"]
Cursor = tuple[int, str, int]  # (id_ms, key_id, id_seq)

CSV_COLUMNS = (
    "timestamp", "event", "key_id", "request_id", "upstream_request_id", "model", "operation",
    "megapixels", "amount_usd", "amount_micro", "hold_micro", "reason", "entry_id",
    "released_micro", "images", "cursor",
)  # fmt: skip

_SQL_PAGE = 5000
_FIRST_TAIL_PAGE = 64  # per key, fetched for every key up front (bounded memory per key)
_TAIL_PAGE = 1000
_KEYS_PER_ROUND_TRIP = 64  # x _FIRST_TAIL_PAGE: at most ~4k entries a round trip
_CHUNK_BYTES = 64 * 1024
_ORDER = itemgetter(0, 1, 2)
_ROW_WIDTH = len(ROW_COLUMNS)
_MAX_SEQ = 2**64 - 1


#: ``<ms>-<seq>.<key id>``: the position of an entry in the export order. Every string of
#: this form is a position (resuming after it is well defined, whether or not such an entry
#: exists), so the cursor's schema says exactly what is accepted.
CURSOR_PATTERN = r"^[0-9]{1,15}-[0-9]{1,18}\.[A-Za-z0-9_-]{1,64}$"
_CURSOR = re.compile(CURSOR_PATTERN)


def encode_cursor(position: Cursor) -> str:
    ms, key_id, seq = position
    return f"{ms}-{seq}.{key_id}"


def decode_cursor(value: str) -> Cursor:
    """The position an ``after=`` cursor names; ``InvalidRequest`` when it is not one."""
    if not _CURSOR.fullmatch(value):
        raise InvalidRequest(
            "'after' is not a cursor: pass the `cursor` of the last entry of the previous page.",
            param="after",
        )
    entry_id, _, key_id = value.partition(".")
    ms, _, seq = entry_id.partition("-")
    return int(ms), key_id, int(seq)


@dataclass(frozen=True)
class ExportQuery:
    key_id: str | None = None
    start_ms: int | None = None  # inclusive
    end_ms: int | None = None  # exclusive
    after: Cursor | None = None
    limit: int | None = None
    before: tuple[int, int] | None = None  # with key_id only: stream ids below this one


# --- the Redis tail, read from a worker thread through the event loop -------------------

Bridge = Callable[[Awaitable[T]], T]


def loop_bridge(loop: asyncio.AbstractEventLoop, timeout_s: float = 30.0) -> Bridge[Any]:
    """Run a coroutine on ``loop`` from a worker thread and wait for its result."""

    def call(awaitable: Awaitable[Any]) -> Any:
        async def wrapped() -> Any:
            return await awaitable

        future: Future[Any] = asyncio.run_coroutine_threadsafe(wrapped(), loop)
        return future.result(timeout_s)

    return call


def _tail_start(key_id: str, progress: Progress | None, query: ExportQuery) -> tuple[int, int]:
    """The first stream id (inclusive) of ``key_id``'s tail this query wants."""
    bounds = [(0, 0)]
    if progress is not None:
        bounds.append((progress.ms, progress.seq + 1))
    if query.start_ms is not None:
        bounds.append((query.start_ms, 0))
    if query.after is not None:
        ms, after_key, seq = query.after
        if key_id < after_key:
            bounds.append((ms + 1, 0))
        elif key_id == after_key:
            bounds.append((ms, seq + 1))
        else:
            bounds.append((ms, 0))
    return max(bounds)


class _Tail:
    """Reads the Redis streams of the keys (from a worker thread)."""

    def __init__(self, redis: Any, bridge: Bridge[Any], end_ms: int | None) -> None:
        self.redis = redis
        self.bridge = bridge
        self.high = str(end_ms - 1) if end_ms is not None else "+"

    async def _first_pages(self, starts: dict[str, tuple[int, int]]) -> dict[str, list[Any]]:
        pages: dict[str, list[Any]] = {}
        keys = list(starts)
        for i in range(0, len(keys), _KEYS_PER_ROUND_TRIP):
            chunk = keys[i : i + _KEYS_PER_ROUND_TRIP]
            async with self.redis.pipeline(transaction=False) as pipe:
                for key_id in chunk:
                    ms, seq = starts[key_id]
                    pipe.xrange(keyspace.ledger(key_id), f"{ms}-{seq}", self.high, _FIRST_TAIL_PAGE)
                replies = await pipe.execute()
            for key_id, reply in zip(chunk, replies, strict=True):
                if reply:
                    pages[key_id] = list(reply)
        return pages

    def first_pages(self, starts: dict[str, tuple[int, int]]) -> dict[str, list[Any]]:
        if self.high != "+" and any(ms > int(self.high) for ms, _ in starts.values()):
            starts = {k: v for k, v in starts.items() if v[0] <= int(self.high)}
        result: dict[str, list[Any]] = self.bridge(self._first_pages(starts))
        return result

    def rows(self, key_id: str, first: list[Any], full: int) -> Iterator[Row]:
        page = first
        size = full
        while True:
            for entry_id, fields in page:
                yield row_from_stream(key_id, text(entry_id), decoded(fields))[:_ROW_WIDTH]
            if len(page) < size:
                return
            low = "(" + text(page[-1][0])
            page = list(
                self.bridge(self.redis.xrange(keyspace.ledger(key_id), low, self.high, _TAIL_PAGE))
            )
            size = _TAIL_PAGE


def _archive_rows(database: LedgerDatabase, query: ExportQuery) -> Iterator[Row]:
    after = query.after
    while True:
        page = database.page(
            after=after,
            key_id=query.key_id,
            start_ms=query.start_ms,
            end_ms=query.end_ms,
            limit=_SQL_PAGE,
        )
        yield from page
        if len(page) < _SQL_PAGE:
            return
        last = page[-1]
        after = (last[0], last[1], last[2])


def merged_rows(
    database: LedgerDatabase,
    redis: Any,
    bridge: Bridge[Any],
    *,
    key_ids: Sequence[str],
    progress: dict[str, Progress],
    query: ExportQuery,
) -> Iterator[Row]:
    """Every ledger entry the query selects, in export order, each once (worker thread)."""
    tail = _Tail(redis, bridge, query.end_ms)
    starts = {k: _tail_start(k, progress.get(k), query) for k in key_ids}
    firsts = tail.first_pages(starts)
    sources: list[Iterator[Row]] = [_archive_rows(database, query)]
    sources.extend(tail.rows(k, page, _FIRST_TAIL_PAGE) for k, page in sorted(firsts.items()))
    last: tuple[int, str, int] | None = None
    emitted = 0
    for row in heapq.merge(*sources, key=_ORDER):
        position = (row[0], row[1], row[2])
        if position == last:
            continue  # archived while this export ran: read from both sides
        if query.before is not None and (row[0], row[2]) >= query.before:
            return
        last = position
        yield row
        emitted += 1
        if query.limit is not None and emitted >= query.limit:
            return


# --- formatting --------------------------------------------------------------------------


@dataclass(frozen=True)
class LedgerEntry:
    """One entry as pages show it (the dashboard's recent entries)."""

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
    def from_row(cls, row: Row) -> LedgerEntry:
        return cls(
            entry_id=row[3],
            event=row[4],
            key_id=row[1],
            request_id=row[5],
            upstream_request_id=row[6],
            model=row[7],
            operation=row[8],
            pixels=row[9],
            amount_micro=row[10],
            hold_micro=row[12],
            reason=row[13],
            timestamp=datetime.fromtimestamp(row[14] / 1000, UTC),
        )

    @property
    def megapixels(self) -> str:
        return str(Decimal(self.pixels) / 1_000_000)


class _Formatter:
    """Turns rows into export fields quickly: the export's CPU is here (one row at a time).

    Consecutive entries share their second and often their pixel count, so both
    conversions are cached; strings are JSON-escaped by the C encoder.
    """

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""
        self._megapixels: dict[int, str] = {}

    def timestamp(self, ts_ms: int) -> str:
        second, ms = divmod(ts_ms, 1000)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{ms:03d}Z"

    def megapixels(self, pixels: int) -> str:
        text = self._megapixels.get(pixels)
        if text is None:
            if len(self._megapixels) > 4096:
                self._megapixels.clear()
            text = self._megapixels[pixels] = str(Decimal(pixels) / 1_000_000)
        return text

    def fields(self, row: Row) -> list[Any]:
        """The values of ``CSV_COLUMNS`` for one row (None where there is none)."""
        (ms, key_id, seq, entry_id, event, request_id, upstream, model, operation, pixels,
         amount, released, hold, reason, ts_ms, _process, images) = row  # fmt: skip
        return [
            self.timestamp(ts_ms), event, key_id, request_id, upstream, model, operation,
            self.megapixels(pixels), format_usd(amount), amount, hold, reason, entry_id,
            released, images, encode_cursor((ms, key_id, seq)),
        ]  # fmt: skip

    def json_line(self, row: Row) -> str:
        values = self.fields(row)
        parts = []
        for name, value in zip(_JSON_NAMES, values, strict=True):
            if value is None:
                parts.append(name + "null")
            elif isinstance(value, str):
                parts.append(name + _json_string(value))
            else:
                parts.append(name + str(value))
        return "{" + ", ".join(parts) + "}\n"


_json_string = json.encoder.encode_basestring_ascii
_JSON_NAMES = tuple(f'"{c}": ' for c in CSV_COLUMNS)


def entry_json(row: Row) -> dict[str, Any]:
    """One entry as the export shows it (JSON lines; CSV has the same columns)."""
    return dict(zip(CSV_COLUMNS, _Formatter().fields(row), strict=True))


def format_chunks(rows: Iterator[Row], fmt: Format) -> Iterator[bytes]:
    """Rows as JSON lines or CSV (with a header), in chunks of about 64 KiB."""
    formatter = _Formatter()
    buffer = io.StringIO()
    if fmt == "csv":
        writer = csv.writer(buffer)
        writer.writerow(CSV_COLUMNS)
        for row in rows:
            writer.writerow(["" if v is None else v for v in formatter.fields(row)])
            if buffer.tell() >= _CHUNK_BYTES:
                yield buffer.getvalue().encode()
                buffer.seek(0)
                buffer.truncate()
    else:
        line = formatter.json_line
        for row in rows:
            buffer.write(line(row))
            if buffer.tell() >= _CHUNK_BYTES:
                yield buffer.getvalue().encode()
                buffer.seek(0)
                buffer.truncate()
    if buffer.tell():
        yield buffer.getvalue().encode()


async def in_thread(chunks: Iterator[T]) -> AsyncIterator[T]:
    """Advance a synchronous iterator in a worker thread, one item per hop."""
    try:
        while True:
            item = await asyncio.to_thread(next, chunks, _DONE)
            if item is _DONE:
                return
            yield item
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            await asyncio.to_thread(close)


_DONE: Any = object()
