"""``GET /v1/usage`` for the calling key."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from app.deps import CurrentKey
from app.schemas import error_responses

router = APIRouter(prefix="/v1", tags=["usage"])


class Limits(BaseModel):
    rpm: int
    max_concurrent: int


class Usage(BaseModel):
    key_id: str
    budget_usd: str | None = Field(description="null = unlimited")
    period: Literal["total", "daily", "monthly"]
    period_start: str | None = Field(description="ISO 8601 UTC; null for a total budget.")
    period_end: str | None
    spent_usd: str
    held_usd: str = Field(description="Reserved by requests in flight.")
    remaining_usd: str | None
    in_flight: int
    limits: Limits


@router.get(
    "/usage",
    operation_id="getUsage",
    response_model=Usage,
    responses=error_responses(401, 503),
    summary="The calling key's budget, spend and limits",
)
async def get_usage(request: Request, key: CurrentKey) -> Usage:
    return Usage.model_validate(await request.app.state.meter.usage(key.id))
