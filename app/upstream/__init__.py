"""The upstream: fal's HTTP API (or the sandbox) behind the gateway's own error types."""

from app.upstream.client import FalClient, app_path, error_for, parse_result, render_detail
from app.upstream.types import (
    GeneratedImage,
    OnSubmitted,
    OutcomeState,
    UpstreamCall,
    UpstreamOutcome,
    UpstreamResult,
)

__all__ = [
    "FalClient",
    "GeneratedImage",
    "OnSubmitted",
    "OutcomeState",
    "UpstreamCall",
    "UpstreamOutcome",
    "UpstreamResult",
    "app_path",
    "error_for",
    "parse_result",
    "render_detail",
]
