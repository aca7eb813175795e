"""Per-key rate limits (enforced inside the metering admission script) and the global gate
that caps the gateway's concurrency towards fal."""

from app.ratelimit.headers import rate_limit_headers

__all__ = ["rate_limit_headers"]
