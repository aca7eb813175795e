"""The interface between the gateway's request path and whatever answers as fal.

The request path builds an :class:`UpstreamCall` (endpoint + exact JSON arguments, produced by
the catalog adapters) and gets back an :class:`UpstreamResult`, or one of the gateway's own
errors (``app.errors``): ``InvalidRequest`` (fal rejected the input, fal's message kept),
``Unavailable`` (fal refused our central key or account; generic message), ``UpstreamError``
(fal 5xx or unreachable), ``UpstreamTimeout``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


@dataclass(frozen=True)
class UpstreamCall:
    """One request to fal: the endpoint id (``fal-ai/flux/dev``) and its JSON input."""

    endpoint: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class GeneratedImage:
    """An image fal returned. Upscalers may omit width/height (topaz does)."""

    url: str
    width: int | None
    height: int | None
    content_type: str | None


@dataclass(frozen=True)
class UpstreamResult:
    request_id: str | None
    images: list[GeneratedImage]
    seed: int | None
    body: dict[str, Any] = field(default_factory=dict)


class OutcomeState(StrEnum):
    PENDING = "pending"  # still queued or running at fal
    COMPLETED = "completed"  # finished with images: bill them
    FAILED = "failed"  # finished without a billable result (an error)
    CANCELLED = "cancelled"  # cancelled before it produced a result
    UNKNOWN = "unknown"  # fal does not know the request (expired, never existed)


@dataclass(frozen=True)
class UpstreamOutcome:
    """What fal says became of a queue request; used by the sweeper after a crash."""

    state: OutcomeState
    result: UpstreamResult | None = None


OnSubmitted = Callable[[str], Awaitable[None]]
"""Called with fal's request id as soon as a queue submit is accepted (before polling)."""
