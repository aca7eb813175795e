"""``GET /admin/usage`` and ``GET /admin/ledger`` (SPEC sections 8 and 13)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from app.deps import AdminDep
from app.errors import InvalidRequest
from app.ledger.export import CURSOR_PATTERN, ExportQuery, decode_cursor
from app.ledger.service import LedgerService
from app.metering.reports import parse_moment
from app.metering.schemas import UsageReport
from app.schemas import error_responses

router = APIRouter(
    prefix="/admin", tags=["admin"], dependencies=[AdminDep], responses=error_responses(401)
)

KeyIdQuery = Annotated[str | None, Query(description="Only this key (default: all keys).")]
# What reports.parse_moment takes: an RFC 3339 date or date-time (with its offset).
_MOMENT_SCHEMA = {
    "anyOf": [{"type": "string", "format": "date"}, {"type": "string", "format": "date-time"}]
}
FromQuery = Annotated[
    str | None,
    Query(
        alias="from",
        description="Inclusive start: an RFC 3339 date (UTC) or date-time with offset.",
        json_schema_extra=_MOMENT_SCHEMA,
    ),
]
ToQuery = Annotated[
    str | None,
    Query(
        alias="to",
        description="Exclusive end: an RFC 3339 date-time, or a date (that whole day included).",
        json_schema_extra=_MOMENT_SCHEMA,
    ),
]
AfterQuery = Annotated[
    str | None,
    Query(
        description="Resume after this entry: the `cursor` of the last entry of the previous page.",
        pattern=CURSOR_PATTERN,
        examples=["1764633600123-0.key_3f9a0c1d2e4b5a69"],
    ),
]
LimitQuery = Annotated[
    int | None, Query(ge=1, le=1_000_000, description="At most this many entries (default: all).")
]

MEDIA_TYPES = {"jsonl": "application/x-ndjson", "csv": "text/csv; charset=utf-8"}


def _window(start: str | None, end: str | None) -> tuple[datetime | None, datetime | None]:
    bounds: list[datetime | None] = []
    for name, value in (("from", start), ("to", end)):
        try:
            bounds.append(parse_moment(value, end=name == "to"))
        except ValueError as exc:
            raise InvalidRequest(
                f"'{name}' must be an RFC 3339 date (2024-06-01) or date-time "
                "(2024-06-01T12:00:00Z).",
                param=name,
            ) from exc
    return bounds[0], bounds[1]


def _ms(moment: datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp() * 1000)


@router.get(
    "/usage",
    operation_id="getUsageReport",
    response_model=UsageReport,
    response_model_exclude_unset=True,  # a row carries only its own group field
    responses=error_responses(400, 503),
)
async def get_usage_report(
    request: Request,
    key_id: KeyIdQuery = None,
    start: FromQuery = None,
    end: ToQuery = None,
    group_by: Literal["key", "model", "day"] = "key",
) -> UsageReport:
    """Settled spend, grouped by key, model or UTC day."""
    low, high = _window(start, end)
    ledger: LedgerService = request.app.state.ledger
    report = await ledger.usage(key_id=key_id, start=low, end=high, group_by=group_by)
    return UsageReport.model_validate(report)


@router.get(
    "/ledger",
    operation_id="exportLedger",
    response_class=StreamingResponse,  # not JSON: the document lists the two real media types
    responses={
        200: {
            "description": "Ledger entries in order (time, key, stream sequence), as JSON lines "
            "or CSV. Each entry carries its `cursor`: pass the last one as `after` for the "
            "next page.",
            "content": {
                "application/x-ndjson": {"schema": {"type": "string"}},
                "text/csv": {"schema": {"type": "string"}},
            },
        },
        **error_responses(400, 503),
    },
)
async def export_ledger(
    request: Request,
    key_id: KeyIdQuery = None,
    start: FromQuery = None,
    end: ToQuery = None,
    format: Literal["jsonl", "csv"] = "jsonl",
    after: AfterQuery = None,
    limit: LimitQuery = None,
) -> StreamingResponse:
    """Every hold, settle and release (archive and recent entries): who, when, model,
    operation, megapixels, amount."""
    low, high = _window(start, end)
    query = ExportQuery(
        key_id=key_id,
        start_ms=_ms(low),
        end_ms=_ms(high),
        after=decode_cursor(after) if after else None,
        limit=limit,
    )
    ledger: LedgerService = request.app.state.ledger
    chunks = await ledger.export(query, format)
    headers = {}
    if format == "csv":
        headers["Content-Disposition"] = 'attachment; filename="ledger.csv"'
    return StreamingResponse(chunks, media_type=MEDIA_TYPES[format], headers=headers)
