"""Time bounds of the usage and ledger routes. Reports and exports themselves live in
``app.ledger`` (rollups, the SQL archive and the Redis tail).

Time filters: ``start`` inclusive, ``end`` exclusive, both UTC.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta


def parse_moment(value: str | None, *, end: bool = False) -> datetime | None:
    """``2024-06-01`` or an ISO 8601 datetime (UTC if no offset) -> an aware datetime.

    A bare date as an ``end`` bound includes that whole day.
    """
    if not value:
        return None
    try:
        day = date.fromisoformat(value)
    except ValueError:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    moment = datetime.combine(day, time(), UTC)
    return moment + timedelta(days=1) if end else moment
