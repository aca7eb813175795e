"""Admin API bodies for gateway keys (SPEC section 8).

Admin input is as strict as client input: numbers are JSON numbers (``true`` and ``"5"`` are
not 1 and 5; an integer-valued ``5.0`` is 5), ``budget_usd`` is a decimal string (at most 6
decimals) or a whole number, ``expires_at`` an RFC 3339 date-time string in the future, and a
name is printable text. Each rule a JSON Schema can state is in the document, as the server
applies it.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictStr,
    WithJsonSchema,
    field_validator,
)

from app.schemas import rfc3339_datetime

BudgetPeriod = Literal["total", "daily", "monthly"]
DEFAULT_BUDGET_PERIOD: BudgetPeriod = "monthly"  # SPEC section 8
NAME_MAX = 200
# What a portable regex can say of ``_printable_name``: no control characters, no space at
# either end (the server also refuses the other Unicode "Other"/"Separator" characters).
NAME_PATTERN = r"^[^\s\x00-\x1f\x7f-\x9f](?:[^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f])?$"


def _number_only(value: object) -> object:
    """Refuse what lax validation would coerce into a number: booleans and strings."""
    if isinstance(value, bool | str):
        raise ValueError("must be a JSON number")
    return value


#: 0 .. 1,000,000,000 USD with at most 6 decimals (micro-dollars), as a decimal string.
BUDGET_PATTERN = r"^(?:[0-9]{1,9}(?:\.[0-9]{1,6})?|1000000000(?:\.0{1,6})?)$"


def _budget(value: object) -> object:
    """A decimal string matching the document's pattern, or a whole JSON number, in range."""
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


# Constraints first, then the validator: so the JSON schema says ``minimum``/``maximum``.
Rpm = Annotated[int, Field(ge=1, le=1_000_000), BeforeValidator(_number_only)]
MaxConcurrent = Annotated[int, Field(ge=1, le=100_000), BeforeValidator(_number_only)]
Amount = Annotated[
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
# RFC 3339, the offset required (``format: date-time``); never a number.
Moment = Annotated[datetime, BeforeValidator(rfc3339_datetime)]
ModelName = Annotated[StrictStr, Field(min_length=1, max_length=200)]


def _printable_name(value: str | None) -> str | None:
    if value is None:
        return None
    if not value.isprintable() or value != value.strip():
        raise ValueError("must be printable text without control characters or surrounding spaces")
    return value


def _in_the_future(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    if value <= datetime.now(UTC):
        raise ValueError("must be in the future")
    return value


def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


def _name_schema(schema: dict[str, Any]) -> None:
    _no_default(schema)
    schema["pattern"] = NAME_PATTERN


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

    name: StrictStr = Field(
        min_length=1,
        max_length=NAME_MAX,
        description="Printable text without surrounding spaces.",
        json_schema_extra={"pattern": NAME_PATTERN},
    )
    budget_usd: Amount | None = None
    budget_period: BudgetPeriod = DEFAULT_BUDGET_PERIOD
    rpm: Rpm | None = None
    max_concurrent: MaxConcurrent | None = None
    models: list[ModelName] | None = Field(
        default=None, max_length=1000, description="Catalog ids or aliases; stored as ids."
    )
    expires_at: Moment | None = None

    _name = field_validator("name")(_printable_name)
    _expires = field_validator("expires_at")(_in_the_future)


class KeyUpdate(_Body):
    """Only the fields present change; ``null`` clears a limit (back to unlimited/default)."""

    # Not nullable: a name and a period always exist (the default is only for the schema).
    name: StrictStr = Field(  # type: ignore[assignment]
        default=None, min_length=1, max_length=NAME_MAX, json_schema_extra=_name_schema
    )
    budget_usd: Amount | None = None
    budget_period: BudgetPeriod = Field(
        default=None,  # type: ignore[arg-type]
        json_schema_extra=_no_default,
    )
    rpm: Rpm | None = None
    max_concurrent: MaxConcurrent | None = None
    models: list[ModelName] | None = Field(default=None, max_length=1000)
    expires_at: Moment | None = None

    _name = field_validator("name")(_printable_name)
    _expires = field_validator("expires_at")(_in_the_future)


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
