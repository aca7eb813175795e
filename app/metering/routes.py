"""``GET /v1/usage`` and the admin usage and ledger routes (SPEC sections 5 and 8)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from app.deps import AdminDep, CurrentKey
from app.metering.meter import Meter
from app.metering.schemas import KeyUsage
from app.schemas import error_responses

router = APIRouter(prefix="/v1", tags=["usage"])
admin_router = APIRouter(
    prefix="/admin", tags=["admin"], dependencies=[AdminDep], responses=error_responses(401)
)


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
