"""Time bounds of the usage and ledger routes. Reports and exports themselves live in
``app.ledger`` (rollups, the SQL archive and the Redis tail).

Time filters: ``start`` inclusive, ``end`` exclusive, both UTC.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, time, timedelta

from app.schemas import parse_rfc3339

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
