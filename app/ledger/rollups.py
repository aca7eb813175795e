"""Usage rollups: per key x UTC day x model x operation totals, kept by ``resolve.lua``.

Layout (see ``app.metering.keyspace``): ``{k:<id>}:rollup:<YYYY-MM>`` hashes with fields
``<YYYY-MM-DD>|<model>|<operation>|<metric>`` - metric ``requests`` (settled), ``released``,
``images``, ``pixels``, ``micro`` (charged micro-dollars) - and the state hash
``{k:<id>}:rollup`` (``since``, ``backfilled``, ``first``).

Reading a report costs one ``HGETALL`` per key and month of the window, pipelined: O(groups),
whatever the number of ledger entries.
"""

from __future__ import annotations

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
        self, key_ids: Sequence[str], months: Sequence[str], first_day: str, last_day: str
    ) -> dict[GroupKey, dict[str, int]]:
        """Totals per group for the days ``first_day..last_day`` (inclusive, ISO dates)."""
        pairs = [(k, m) for k in key_ids for m in months]
        groups: dict[GroupKey, dict[str, int]] = {}
        for start in range(0, len(pairs), _KEYS_PER_ROUND_TRIP):
            chunk = pairs[start : start + _KEYS_PER_ROUND_TRIP]
            async with self.redis.pipeline(transaction=False) as pipe:
                for key_id, month in chunk:
                    pipe.hgetall(keyspace.rollup_month(key_id, month))
                replies = await pipe.execute()
            for (key_id, _), fields in zip(chunk, replies, strict=True):
                for name, value in fields.items():
                    day, model, operation, metric = text(name).rsplit("|", 3)
                    if not first_day <= day <= last_day:
                        continue
                    group = groups.setdefault((key_id, day, model, operation), {})
                    group[metric] = group.get(metric, 0) + int(text(value))
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
        args: list[str | int | float] = [since]
        for day, model, operation, metrics in totals:
            for metric, value in metrics.items():
                if value:
                    args += [day[:7], f"{day}|{model}|{operation}|{metric}", value]
        keys = [keyspace.rollup_state(key_id), keyspace.rollup_month_prefix(key_id)]
        return bool(int(text(await self._apply(keys, args))))
