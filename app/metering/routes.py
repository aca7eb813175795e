"""``GET /v1/usage`` and the admin usage and ledger routes (SPEC sections 5 and 8)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from app.deps import AdminDep, CurrentKey
from app.errors import InvalidRequest, NotFound
from app.metering.meter import Meter, RequestRecord
from app.metering.reports import export_csv, export_jsonl, iter_ledger, parse_moment, usage_report
from app.metering.schemas import (
    KeyUsage,
    RequestCost,
    RequestImage,
    RequestStatus,
    UsageReport,
)
from app.money import format_usd
from app.schemas import error_responses

router = APIRouter(prefix="/v1", tags=["usage"])
admin_router = APIRouter(
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


async def _started(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """Fetch the first chunk before answering, so an unreachable Redis is a 503, not a cut
    stream."""
    first = await anext(chunks, None)

    async def stream() -> AsyncIterator[str]:
        if first is not None:
            yield first
        async for chunk in chunks:
            yield chunk

    return stream()


@router.get(
    "/usage",
    operation_id="getUsage",
    response_model=KeyUsage,
    responses=error_responses(401, 503),
)
async def get_usage(request: Request, key: CurrentKey) -> KeyUsage:
    """The calling key's budget, period, spend, holds and limits."""
    meter: Meter = request.app.state.meter
    return KeyUsage.model_validate(await meter.usage(key.id))


_REQUEST_ID = re.compile(r"req_[0-9a-f]{32}")


@router.get(
    "/requests/{request_id}",
    operation_id="getRequest",
    response_model=RequestStatus,
    responses=error_responses(401, 404, 503),
)
async def get_request(request: Request, request_id: str, key: CurrentKey) -> RequestStatus:
    """One of the calling key's requests: its status, cost and, once known, its images.

    A 502 or 504 that came after fal accepted the job names this request id: fal's work is
    settled (or released) here once fal tells its outcome. Another key's request is a 404.
    """
    meter: Meter = request.app.state.meter
    record = (
        await meter.request_record(key.id, request_id)
        if _REQUEST_ID.fullmatch(request_id)
        else None
    )
    if record is None:
        raise NotFound(f"No request '{request_id[:64]}' for this key.")
    return request_status(record)


def request_status(record: RequestRecord) -> RequestStatus:
    cost = None
    if record.resolved:
        charged = record.charged or 0
        pixels = (record.pixels or 0) if charged else 0
        cost = RequestCost(amount_usd=format_usd(charged), megapixels=pixels / 1_000_000)
    images = None
    if record.images is not None:
        images = [
            RequestImage(url=i.url, width=i.width, height=i.height, content_type=i.content_type)
            for i in record.images
        ]
    return RequestStatus(
        request_id=record.request_id,
        status=record.status,
        operation=record.operation,
        model=record.model,
        cost=cost,
        images=images,
        upstream_request_id=record.upstream_request_id,
        created_at=record.created_at,
    )


@admin_router.get(
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
    """Settled spend from the ledger, grouped by key, model or UTC day."""
    low, high = _window(start, end)
    report = await usage_report(
        request.app.state.meter.redis,
        key_ids=[key_id] if key_id else None,
        start=low,
        end=high,
        group_by=group_by,
    )
    return UsageReport.model_validate(report)


@admin_router.get(
    "/ledger",
    operation_id="exportLedger",
    response_class=StreamingResponse,  # not JSON: the document lists the two real media types
    responses={
        200: {
            "description": "Ledger entries in time order, as JSON lines or CSV.",
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
) -> StreamingResponse:
    """Every hold, settle and release: who, when, model, operation, megapixels, amount."""
    low, high = _window(start, end)
    redis = request.app.state.meter.redis
    entries = iter_ledger(redis, key_ids=[key_id] if key_id else None, start=low, end=high)
    if format == "csv":
        return StreamingResponse(
            await _started(export_csv(entries)),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": 'attachment; filename="ledger.csv"'},
        )
    return StreamingResponse(
        await _started(export_jsonl(entries)), media_type="application/x-ndjson"
    )
