"""Response bodies of the usage routes."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field
from pydantic.json_schema import SkipJsonSchema


class Limits(BaseModel):
    rpm: int = Field(description="Requests per minute (0 = unlimited).", examples=[600])
    max_concurrent: int = Field(description="Requests in flight (0 = unlimited).", examples=[16])


class KeyUsage(BaseModel):
    """The calling key's budget and spend in its current period."""

    key_id: str = Field(examples=["key_3f9a0c1d2e4b"])
    budget_usd: str | None = Field(description="null = unlimited.", examples=["50.000000"])
    period: str = Field(description="total, daily or monthly (UTC).", examples=["monthly"])
    period_start: str | None = Field(description="ISO 8601 UTC; null for total.")
    period_end: str | None = Field(description="ISO 8601 UTC, exclusive; null for total.")
    spent_usd: str = Field(description="Settled in this period.", examples=["1.234567"])
    held_usd: str = Field(description="Held by requests in flight.", examples=["0.011797"])
    remaining_usd: str | None = Field(description="null = unlimited.", examples=["48.753636"])
    in_flight: int = Field(description="Requests of this key in flight now.")
    limits: Limits


class UsageRow(BaseModel):
    """One group: a key id, a model id or a UTC day, by ``group_by`` (the one field present)."""

    key: str | SkipJsonSchema[None] = Field(default=None, description="group_by=key: a key id.")
    model: str | SkipJsonSchema[None] = Field(
        default=None, description="group_by=model: a catalog id."
    )
    day: str | SkipJsonSchema[None] = Field(
        default=None,
        description="group_by=day: a UTC day.",
        json_schema_extra={"format": "date"},
        examples=["2024-06-01"],
    )
    requests: int = Field(description="Settled requests.")
    released: int = Field(description="Failed or cancelled requests (charged nothing).")
    amount_usd: str = Field(description="Settled total.", examples=["0.235940"])
    megapixels: str = Field(examples=["15.728640"])


class UsageTotals(BaseModel):
    requests: int
    released: int
    amount_usd: str
    megapixels: str


class UsageReport(BaseModel):
    group_by: Literal["key", "model", "day"] = Field(examples=["key"])
    from_: str | None = Field(
        alias="from", description="Inclusive, ISO 8601.", json_schema_extra={"format": "date-time"}
    )
    to: str | None = Field(
        description="Exclusive, ISO 8601.", json_schema_extra={"format": "date-time"}
    )
    rows: list[UsageRow]
    total: UsageTotals


class RequestImage(BaseModel):
    url: str
    width: int | None
    height: int | None
    content_type: str | None


class RequestCost(BaseModel):
    amount_usd: str = Field(examples=["0.011797"])
    megapixels: float = Field(examples=[0.786432])


class RequestStatus(BaseModel):
    """One of the calling key's requests, as the ledger knows it (SPEC section 10)."""

    request_id: str = Field(examples=["req_4b2f0c6a9d8e4f1a8c3b2a1f0e9d8c7b"])
    status: Literal["pending", "completed", "failed", "cancelled", "unresolved"] = Field(
        description="pending: still running; unresolved: fal accepted it and the gateway is "
        "asking fal for the outcome; completed: settled; failed/cancelled: released, charged "
        "nothing."
    )
    operation: str = Field(examples=["generate"])
    model: str = Field(examples=["fal-ai/flux/dev"])
    cost: RequestCost | None = Field(description="What was charged, once known.")
    images: list[RequestImage] | None = Field(description="What fal produced, once known.")
    upstream_request_id: str | None = Field(description="fal's request id, once fal took it.")
    created_at: str = Field(examples=["2026-12-01T12:00:00.000Z"])
