"""Schemas shared by every route: the error envelope of SPEC section 7 and the response headers,
for the OpenAPI document, and the number type that request bodies share."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, Field
from pydantic.json_schema import SkipJsonSchema

from app.errors import ERROR_TYPES

_DESCRIPTIONS = {
    400: ("invalid_request", "The request is malformed; `param` names the field."),
    401: ("unauthorized", "Missing, unknown, revoked or expired key or token."),
    402: ("budget_exceeded", "Not enough budget left for this request's estimate."),
    403: ("forbidden", "This key may not use the model."),
    404: ("not_found", "No such resource or model."),
    405: ("invalid_request", "The route does not take this method; `Allow` lists those it takes."),
    408: ("request_timeout", "The request body stopped arriving; the connection is closed."),
    409: ("idempotency_conflict", "Idempotency-Key reused with a different body."),
    413: ("payload_too_large", "Body or input image over the limits."),
    429: ("rate_limited", "Over the key's rate limits; see Retry-After."),
    502: ("upstream_error", "fal failed or could not be reached."),
    503: ("unavailable", "The gateway cannot serve right now (state store or upstream account)."),
    504: ("upstream_timeout", "fal did not answer in time."),
}

USD_PATTERN = r"^[0-9]+\.[0-9]{6}$"
_USD = {"type": "string", "pattern": USD_PATTERN}
_COUNT = {"type": "integer", "minimum": 0}


def whole_number(value: object) -> object:
    """``4.0`` -> ``4``: JSON Schema's ``integer`` includes integer-valued numbers."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


#: An integer that also arrives as an integer-valued JSON number (``4.0``); never a bool or a
#: string, also in strict models.
WholeNumber = Annotated[int, BeforeValidator(whole_number)]


_DATETIME = re.compile(
    r"([0-9]{4}-[0-9]{2}-[0-9]{2})[Tt]([0-9]{2}:[0-9]{2}:[0-9]{2})(?:\.([0-9]+))?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})"
)


def parse_rfc3339(value: str) -> datetime:
    """An RFC 3339 date-time (the offset required, as ``format: date-time`` says), or a
    ``ValueError``."""
    match = _DATETIME.fullmatch(value)
    if match is None:
        raise ValueError("must be an RFC 3339 date-time such as 2030-01-01T00:00:00Z")
    day, clock, fraction, offset = match.groups()
    micros = f".{(fraction or '')[:6]:0<6}"
    offset = "+00:00" if offset in ("Z", "z") else offset
    return datetime.fromisoformat(f"{day}T{clock}{micros}{offset}")


def rfc3339_datetime(value: object) -> object:
    """Before-validator: a JSON date-time is a string in RFC 3339 form, not a number."""
    if isinstance(value, str):
        return parse_rfc3339(value)
    if isinstance(value, datetime):
        return value
    raise ValueError("must be an RFC 3339 date-time string such as 2030-01-01T00:00:00Z")


def header(description: str, schema: dict[str, Any], *, required: bool = False) -> dict[str, Any]:
    return {"description": description, "required": required, "schema": schema}


REQUEST_ID = {
    "X-Request-Id": header(
        "The gateway's id for this request (also in the error envelope).",
        {"type": "string", "minLength": 1},
        required=True,
    )
}
RATE_LIMIT = {
    "RateLimit-Limit": header("The key's requests per minute (absent when unlimited).", _COUNT),
    "RateLimit-Remaining": header("Requests left in the current minute.", _COUNT),
    "RateLimit-Reset": header("Seconds until the whole allowance is available again.", _COUNT),
}
METERED = {
    **REQUEST_ID,
    "X-Cost-USD": header("What this request cost (6 decimals).", _USD, required=True),
    "X-Budget-Remaining-USD": header("Budget left in the period (absent when unlimited).", _USD),
    "Idempotent-Replayed": header(
        "`true` when this is the stored answer of an earlier request with the same "
        "Idempotency-Key.",
        {"type": "string", "enum": ["true"]},
    ),
    **RATE_LIMIT,
}
_RETRY_AFTER = "Seconds to wait before retrying."
_ERROR_HEADERS: dict[int, dict[str, Any]] = {
    402: RATE_LIMIT,
    405: {
        "Allow": header(
            "The methods this route takes.", {"type": "string", "minLength": 1}, required=True
        )
    },
    429: {"Retry-After": header(_RETRY_AFTER, {"type": "integer", "minimum": 1}, required=True)}
    | RATE_LIMIT,
    503: {"Retry-After": header(_RETRY_AFTER, {"type": "integer", "minimum": 1})},
}


class ErrorDetail(BaseModel):
    type: str = Field(json_schema_extra={"enum": list(ERROR_TYPES)}, examples=["invalid_request"])
    message: str = Field(examples=["Invalid value for 'num_images': ..."])
    param: str | None = Field(
        description="The offending field, query parameter or header; null when none.",
        examples=["num_images"],
    )
    request_id: str = Field(examples=["req_4f1c2b..."])
    estimate_usd: str | SkipJsonSchema[None] = Field(
        default=None, pattern=USD_PATTERN, description="402 only: this request's estimate."
    )
    remaining_usd: str | SkipJsonSchema[None] = Field(
        default=None, pattern=USD_PATTERN, description="402 only: the key's budget left."
    )
    limit_type: str | SkipJsonSchema[None] = Field(
        default=None,
        json_schema_extra={"enum": ["rpm", "concurrency"]},
        description="429 from the key's own limits: which one was hit.",
    )
    checks: dict[str, str] | SkipJsonSchema[None] = Field(
        default=None,
        json_schema_extra={"additionalProperties": {"type": "string", "enum": ["ok", "failed"]}},
        description="503 from /readyz only: each readiness check's result.",
    )


class ErrorEnvelope(BaseModel):
    error: ErrorDetail


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries for the error statuses a route can answer."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        type_, description = _DESCRIPTIONS[code]
        out[code] = {
            "model": ErrorEnvelope,
            "description": description,
            "headers": {**REQUEST_ID, **_ERROR_HEADERS.get(code, {})},
            "content": {
                "application/json": {
                    "example": {
                        "error": {
                            "type": type_,
                            "message": description,
                            "param": None,
                            "request_id": "req_0123456789abcdef",
                        }
                    }
                }
            },
        }
    return out
