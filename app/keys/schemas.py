"""Admin API bodies for gateway keys (SPEC section 8)."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

BudgetPeriod = Literal["total", "daily", "monthly"]


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
    budget_usd: Decimal | None = Field(
        default=None, ge=0, le=Decimal("1000000000"), decimal_places=6, allow_inf_nan=False
    )
    budget_period: BudgetPeriod = "monthly"
    rpm: int | None = Field(default=None, ge=1, le=1_000_000)
    max_concurrent: int | None = Field(default=None, ge=1, le=100_000)
    models: list[str] | None = Field(default=None, max_length=1000)
    expires_at: datetime | None = None


class KeyUpdate(_Body):
    """Only the fields present change; ``null`` clears a limit (back to unlimited/default)."""

    name: str | None = Field(default=None, min_length=1, max_length=200)
    budget_usd: Decimal | None = Field(
        default=None, ge=0, le=Decimal("1000000000"), decimal_places=6, allow_inf_nan=False
    )
    budget_period: BudgetPeriod | None = None
    rpm: int | None = Field(default=None, ge=1, le=1_000_000)
    max_concurrent: int | None = Field(default=None, ge=1, le=100_000)
    models: list[str] | None = Field(default=None, max_length=1000)
    expires_at: datetime | None = None


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
