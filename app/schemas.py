"""Schemas shared by every route: the error envelope of SPEC section 7, for OpenAPI."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

_DESCRIPTIONS = {
    400: ("invalid_request", "The request is malformed; `param` names the field."),
    401: ("unauthorized", "Missing, unknown, revoked or expired key or token."),
    402: ("budget_exceeded", "Not enough budget left for this request's estimate."),
    403: ("forbidden", "This key may not use the model."),
    404: ("not_found", "No such resource or model."),
    409: ("idempotency_conflict", "Idempotency-Key reused with a different body."),
    413: ("payload_too_large", "Body or input image over the limits."),
    429: ("rate_limited", "Over the key's rate limits; see Retry-After."),
    502: ("upstream_error", "fal failed or could not be reached."),
    503: ("unavailable", "The gateway cannot serve right now (state store or upstream account)."),
    504: ("upstream_timeout", "fal did not answer in time."),
}


class ErrorDetail(BaseModel):
    type: str = Field(examples=["invalid_request"])
    message: str = Field(examples=["Invalid value for 'num_images': ..."])
    param: str | None = Field(default=None, examples=["num_images"])
    request_id: str = Field(examples=["req_4f1c2b..."])
    estimate_usd: str | None = Field(default=None, description="402 only.")
    remaining_usd: str | None = Field(default=None, description="402 only.")


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
