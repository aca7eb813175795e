"""Usage rollups: per key x UTC day x model x operation totals, kept by ``resolve.lua``.

Layout (see ``app.metering.keyspace``), per key and UTC month, three views of the same totals
- metric ``requests`` (settled), ``released``, ``images``, ``pixels``, ``micro`` (charged
micro-dollars):

- ``{k:<id>}:rollup:<YYYY-MM>``    fields ``<YYYY-MM-DD>|<model>|<operation>|<metric>``
- ``{k:<id>}:rollup:<YYYY-MM>:d``  fields ``<YYYY-MM-DD>|<metric>``
- ``{k:<id>}:rollup:<YYYY-MM>:m``  fields ``<model>|<operation>|<metric>`` (the whole month)

and the state hash ``{k:<id>}:rollup`` (``since``, ``backfilled``, ``first``). A report reads,
per key and month of its window, the smallest view that answers it (pipelined): O(groups),
whatever the number of ledger entries.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any

from app.metering import keyspace
from app.metering.lua import LuaScript, text

METRICS = ("requests", "released", "images", "pixels", "micro")
GroupKey = tuple[str, str, str, str]  # key id, UTC day (YYYY-MM-DD), model, operation

_KEYS_PER_ROUND_TRIP = 256


@dataclass(frozen=True)
class RollupPart:
    """One month hash to read: ``kind`` ``""`` (day x model x operation), ``"d"`` (by day) or
    ``"m"`` (model x operation, whole month); days outside ``first_day..last_day`` skipped."""

    month: str
    kind: str = ""
    first_day: str = "0000-00-00"
    last_day: str = "9999-99-99"


def _add_fields(
    groups: dict[GroupKey, dict[str, int]], key_id: str, part: RollupPart, fields: Any
) -> None:
    low, high = part.first_day, part.last_day
    for raw_name, raw_value in fields.items():
        name = text(raw_name)
        if part.kind == "m":
            model, operation, metric = name.rsplit("|", 2)
            group = (key_id, part.month, model, operation)
        elif part.kind == "d":
            day, metric = name.split("|", 1)
            if not low <= day <= high:
                continue
            group = (key_id, day, "", "")
        else:
            day, model, operation, metric = name.rsplit("|", 3)
            if not low <= day <= high:
                continue
            group = (key_id, day, model, operation)
        totals = groups.get(group)
        if totals is None:
            totals = groups[group] = {}
        totals[metric] = totals.get(metric, 0) + int(raw_value)


def _add_chunk(
    groups: dict[GroupKey, dict[str, int]],
    chunk: Sequence[tuple[str, RollupPart]],
    replies: Sequence[Any],
) -> None:
    for (key_id, part), fields in zip(chunk, replies, strict=True):
        _add_fields(groups, key_id, part, fields)


@dataclass(frozen=True)
class RollupState:
    since: str | None
    backfilled: bool
    first: str | None  # earliest month (YYYY-MM) with rollups


def months_between(first: str, last: str) -> list[str]:
    """``YYYY-MM`` months from ``first`` to ``last`` inclusive."""
    year, month = int(first[:4]), int(first[5:7])
    end = (int(last[:4]), int(last[5:7]))
    months = []
    while (year, month) <= end:
        months.append(f"{year:04d}-{month:02d}")
        month += 1
        if month > 12:
            year, month = year + 1, 1
    return months


def month_of(day: date) -> str:
    return f"{day.year:04d}-{day.month:02d}"


class Rollups:
    """Read the rollups, and the two steps of the one-time backfill."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis
        self._mark = LuaScript(redis, __package__, "rollup_mark.lua")
        self._apply = LuaScript(redis, __package__, "rollup_apply.lua")

    async def states(self, key_ids: Sequence[str]) -> dict[str, RollupState]:
        found: dict[str, RollupState] = {}
        for start in range(0, len(key_ids), _KEYS_PER_ROUND_TRIP):
            chunk = key_ids[start : start + _KEYS_PER_ROUND_TRIP]
            async with self.redis.pipeline(transaction=False) as pipe:
                for key_id in chunk:
                    pipe.hmget(keyspace.rollup_state(key_id), "since", "backfilled", "first")
                replies = await pipe.execute()
            for key_id, (since, backfilled, first) in zip(chunk, replies, strict=True):
                found[key_id] = RollupState(
                    since=None if since is None else text(since),
                    backfilled=backfilled is not None and text(backfilled) == "1",
                    first=None if first is None else text(first),
                )
        return found

    async def read(
        self, key_ids: Sequence[str], parts: Sequence[RollupPart]
    ) -> dict[GroupKey, dict[str, int]]:
        """Totals per group from the given month hashes of every key (one round trip per
        ~256 hashes). Groups of a ``"d"`` part have no model/operation (``""``); those of an
        ``"m"`` part have the month (``YYYY-MM``) for day."""
        pairs = [(k, p) for k in key_ids for p in parts]
        groups: dict[GroupKey, dict[str, int]] = {}
        for start in range(0, len(pairs), _KEYS_PER_ROUND_TRIP):
            chunk = pairs[start : start + _KEYS_PER_ROUND_TRIP]
            async with self.redis.pipeline(transaction=False) as pipe:
                for key_id, part in chunk:
                    suffix = part.month if not part.kind else f"{part.month}:{part.kind}"
                    pipe.hgetall(keyspace.rollup_month(key_id, suffix))
                replies = await pipe.execute()
            # Tens of thousands of fields for a wide window: parsed off the event loop.
            await asyncio.to_thread(_add_chunk, groups, chunk, replies)
        return groups

    async def mark(self, key_id: str) -> tuple[str, bool]:
        """Fix ``since`` for the backfill; returns ``(since, already backfilled)``."""
        since, backfilled = await self._mark(
            [keyspace.rollup_state(key_id), keyspace.ledger(key_id)], []
        )
        return text(since), text(backfilled) == "1"

    async def apply(
        self, key_id: str, since: str, totals: Iterable[tuple[str, str, str, Mapping[str, int]]]
    ) -> bool:
        """Add backfilled totals ``(day, model, operation, {metric: value})`` once."""
        # The same three views resolve.lua keeps (see RollupPart).
        sums: dict[tuple[str, str], int] = {}
        for day, model, operation, metrics in totals:
            month = day[:7]
            for metric, value in metrics.items():
                if not value:
                    continue
                for target in (
                    (month, f"{day}|{model}|{operation}|{metric}"),
                    (f"{month}:d", f"{day}|{metric}"),
                    (f"{month}:m", f"{model}|{operation}|{metric}"),
                ):
                    sums[target] = sums.get(target, 0) + value
        args: list[str | int | float] = [since]
        for (suffix, name), value in sums.items():
            args += [suffix, name, value]
        keys = [keyspace.rollup_state(key_id), keyspace.rollup_month_prefix(key_id)]
        return bool(int(text(await self._apply(keys, args))))
