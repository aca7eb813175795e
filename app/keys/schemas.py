"""Admin API bodies for gateway keys (SPEC section 8)."""

from __future__ import annotations

import re
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, WithJsonSchema
from pydantic.json_schema import SkipJsonSchema

from app.schemas import rfc3339_datetime, whole_number

BudgetPeriod = Literal["total", "daily", "monthly"]

#: 0 .. 1,000,000,000 USD with at most 6 decimals (micro-dollars), as a decimal string.
BUDGET_PATTERN = r"^(?:[0-9]{1,9}(?:\.[0-9]{1,6})?|1000000000(?:\.0{1,6})?)$"


def _budget(value: object) -> object:
    """A decimal string (or a whole JSON number) in the budget's range, else a clear error."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    elif isinstance(value, Decimal) and value.is_finite():
        value = format(value, "f")
    if isinstance(value, str) and re.fullmatch(BUDGET_PATTERN, value):
        return Decimal(value)
    raise ValueError(
        'must be a decimal string such as "50" or "12.5" (0..1000000000, at most 6 '
        "decimals) or a whole number"
    )


Budget = Annotated[
    Decimal,
    BeforeValidator(_budget),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": BUDGET_PATTERN},
                {"type": "integer", "minimum": 0, "maximum": 1_000_000_000},
            ],
            "description": "USD, as a decimal string (at most 6 decimals) or a whole number.",
        }
    ),
]
# Constraints before the validator, so that the document shows them as minimum/maximum.
Rpm = Annotated[int, Strict(), Field(ge=1, le=1_000_000), BeforeValidator(whole_number)]
MaxConcurrent = Annotated[int, Strict(), Field(ge=1, le=100_000), BeforeValidator(whole_number)]
Moment = Annotated[datetime, BeforeValidator(rfc3339_datetime)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class KeyCreate(_Body):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"name": "team-a", "budget_usd": "50", "budget_period": "monthly", "rpm": 60}
            ]
        },
    )

    name: str = Field(min_length=1, max_length=200)
    budget_usd: Budget | None = None
    budget_period: BudgetPeriod = "monthly"
    rpm: Rpm | None = None
    max_concurrent: MaxConcurrent | None = None
    models: list[str] | None = Field(default=None, max_length=1000)
    expires_at: Moment | None = None


class KeyUpdate(_Body):
    """Only the fields present change; ``null`` clears a limit (back to unlimited/default)."""

    # name and budget_period cannot be cleared: absent from the document's types, refused as null.
    name: Annotated[str, Field(min_length=1, max_length=200)] | SkipJsonSchema[None] = None
    budget_usd: Budget | None = None
    budget_period: BudgetPeriod | SkipJsonSchema[None] = None
    rpm: Rpm | None = None
    max_concurrent: MaxConcurrent | None = None
    models: list[str] | None = Field(default=None, max_length=1000)
    expires_at: Moment | None = None


class KeyOut(BaseModel):
    id: str
    name: str
    prefix: str = Field(description="The first characters of the key, to recognise it.")
    status: Literal["active", "revoked", "expired"]
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    budget_usd: str | None = Field(description="6-decimal USD string; null = unlimited.")
    budget_period: BudgetPeriod
    rpm: int | None = Field(description="Requests per minute; null = the gateway default.")
    max_concurrent: int | None
    models: list[str] | None = Field(description="Allowed model ids; null = all.")


class KeyCreated(KeyOut):
    key: str = Field(description="The secret key. Shown only once.")


class KeyList(BaseModel):
    keys: list[KeyOut]
