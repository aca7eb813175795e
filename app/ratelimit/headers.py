"""The ``RateLimit-*`` response headers (IETF draft httpapi-ratelimit-headers, the
``RateLimit-Limit`` / ``-Remaining`` / ``-Reset`` trio) and ``Retry-After``."""

from __future__ import annotations


def rate_limit_headers(
    limit: int, remaining: int, reset_s: int, *, retry_after_s: int | None = None
) -> dict[str, str]:
    """Headers describing the key's per-minute quota.

    ``reset_s`` is the number of seconds until ``RateLimit-Remaining`` goes up by one (0 at the
    full allowance); on a refusal it equals ``Retry-After``. A key without a per-minute limit
    (``limit <= 0``) gets no ``RateLimit-*`` headers.
    """
    headers: dict[str, str] = {}
    if limit > 0:
        headers["RateLimit-Limit"] = str(limit)
        headers["RateLimit-Remaining"] = str(max(0, remaining))
        headers["RateLimit-Reset"] = str(max(0, reset_s))
    if retry_after_s is not None:
        headers["Retry-After"] = str(max(1, retry_after_s))
    return headers
