"""Bodies of fal's own API as falgate serves it (fal-protocol.md sections 1.3 and 4).

Requests are fal model inputs (free-form JSON objects, checked against the catalog's field
lists by the service), so only responses are modelled here: for the OpenAPI document and so
the shapes the official clients parse are written down once.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

QueueState = Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]


class FalError(BaseModel):
    """fal's error shape: ``detail`` is a message or FastAPI's list of ``{loc, msg, type}``."""

    detail: str | list[dict[str, Any]]
    error_type: str = Field(
        description="falgate's error type (SPEC section 7), e.g. "
        "`budget_exceeded`; also sent as `X-Fal-Error-Type`."
    )


class QueueLinks(BaseModel):
    request_id: str = Field(description="falgate's request id (owned by the submitting key).")
    response_url: str
    status_url: str
    cancel_url: str


class SubmitResponse(QueueLinks):
    status: QueueState = "IN_QUEUE"
    queue_position: int = 0


class StatusResponse(QueueLinks):
    status: QueueState
    queue_position: int | None = None
    logs: list[dict[str, Any]] | None = Field(
        default=None, description="Present always; null unless `logs=1`/`logs=true`."
    )
    metrics: dict[str, Any] | None = None
    error: str | None = None
    error_type: str | None = None


class CancelResponse(BaseModel):
    status: Literal["OK", "CANCELLATION_REQUESTED", "ALREADY_COMPLETED", "NOT_FOUND"]


def fal_error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries in fal's error shape."""
    return {code: {"model": FalError, "description": "fal-shaped error"} for code in codes}
