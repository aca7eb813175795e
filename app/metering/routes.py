"""``GET /v1/usage`` (SPEC section 5); the admin usage and ledger routes are in ``app.ledger``."""

from __future__ import annotations

from fastapi import APIRouter, Request

from app.deps import CurrentKey
from app.metering.meter import Meter
from app.metering.schemas import KeyUsage
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
