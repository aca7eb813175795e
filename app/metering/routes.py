"""``GET /v1/usage`` and ``GET /v1/requests/{id}`` (SPEC sections 5 and 10); the admin usage
and ledger routes are in ``app.ledger``."""

from __future__ import annotations

import re

from fastapi import APIRouter, Request

from app.deps import CurrentKey
from app.errors import NotFound
from app.metering.meter import Meter, RequestRecord
from app.metering.schemas import (
    KeyUsage,
    RequestCost,
    RequestImage,
    RequestStatus,
)
from app.money import format_usd
from app.schemas import error_responses

router = APIRouter(prefix="/v1", tags=["usage"])


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
