"""Calendar-aligned UTC budget periods."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

BudgetPeriod = Literal["total", "daily", "monthly"]
PERIODS: tuple[BudgetPeriod, ...] = ("total", "daily", "monthly")


@dataclass(frozen=True)
class PeriodStarts:
    """The start of the current UTC day and month, as epoch seconds (the counters' names)."""

    day: int
    month: int

    @classmethod
    def at(cls, epoch_s: float) -> PeriodStarts:
        now = datetime.fromtimestamp(epoch_s, UTC)
        day = now.replace(hour=0, minute=0, second=0, microsecond=0)
        return cls(day=int(day.timestamp()), month=int(day.replace(day=1).timestamp()))


def period_bounds(period: str, epoch_s: float) -> tuple[datetime | None, datetime | None]:
    """``[start, end)`` of the period containing ``epoch_s``; ``(None, None)`` for ``total``."""
    starts = PeriodStarts.at(epoch_s)
    if period == "daily":
        start = datetime.fromtimestamp(starts.day, UTC)
        return start, start + timedelta(days=1)
    if period == "monthly":
        start = datetime.fromtimestamp(starts.month, UTC)
        if start.month == 12:
            return start, start.replace(year=start.year + 1, month=1)
        return start, start.replace(month=start.month + 1)
    return None, None


def iso(moment: datetime | None) -> str | None:
    """``2024-06-01T00:00:00Z``."""
    if moment is None:
        return None
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
