"""The sandbox's knobs: simulated latency, fal's concurrency queue, and injected faults.

Everything here can be given to :func:`create_sandbox_app` and changed at runtime through the
control API (``PUT /_sandbox/config``), because tests share one sandbox process between
several gateway processes.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

FaultScope = Literal["any", "generate", "run", "submit", "status", "result", "cancel", "job"]
"""Which calls a fault hits.

``run`` is the sync ``POST /{model}``; ``submit``/``status``/``result``/``cancel`` are the queue
calls; ``generate`` is run + submit; ``any`` is every model call (not ``job``). ``job`` is the
queued work itself: the request is accepted and then fails, stalls or hangs while it runs.
"""

FaultKind = Literal["error", "rate_limit", "timeout", "delay", "hang", "drop", "bad_key", "locked"]
"""What a fault does.

- ``error``: answer ``status_code`` with a fal-like body (422 detail list, 503/504 with
  ``error_type``, ...); for ``job`` the request completes with that error.
- ``rate_limit``: 429 (optionally with ``Retry-After: retry_after_s``).
- ``timeout``: wait ``delay_ms`` then fal's 504 ``request_timeout`` (with
  ``X-Fal-Request-Timeout-Type: user`` when ``user_timeout``).
- ``delay``: wait ``delay_ms`` then answer normally (a slow upstream).
- ``hang``: never answer (never finish, for ``job``) until the client goes away / cancels.
- ``drop``: close the connection without sending a response.
- ``bad_key``: 401 ``No user found for Key ID and Secret``.
- ``locked``: 403 ``User is locked. Reason: Exhausted balance. ...``.
"""

_JOB_KINDS = {"error", "rate_limit", "timeout", "delay", "hang"}


class FaultRule(BaseModel):
    """One injected fault; the first active rule matching a call applies to it."""

    model_config = ConfigDict(extra="forbid")

    kind: FaultKind = "error"
    scope: FaultScope = "any"
    endpoint: str | None = Field(
        default=None, description="Only calls for this model id (exact), e.g. fal-ai/flux/dev."
    )
    status_code: int = Field(default=500, ge=400, le=599)
    detail: str | list[dict[str, Any]] | None = Field(
        default=None, description="Body 'detail' to answer with instead of the default."
    )
    error_type: str | None = None
    user_timeout: bool = False
    retry_after_s: int | None = Field(default=None, ge=0)
    delay_ms: int = Field(default=0, ge=0)
    count: int | None = Field(
        default=None, ge=1, description="Apply to the next N matching calls only; None = all."
    )
    hits: int = Field(default=0, ge=0, description="How many calls this rule has hit so far.")

    @model_validator(mode="after")
    def _job_kinds(self) -> FaultRule:
        if self.scope == "job" and self.kind not in _JOB_KINDS:
            raise ValueError(f"kind '{self.kind}' cannot apply to scope 'job'")
        return self

    @property
    def active(self) -> bool:
        return self.count is None or self.hits < self.count

    def covers(self, scope: FaultScope) -> bool:
        if self.scope == scope:
            return True
        if scope == "job":
            return False
        if self.scope == "any":
            return True
        return self.scope == "generate" and scope in ("run", "submit")


class SandboxConfig(BaseModel):
    """How the sandbox behaves. Partial updates go through ``PUT /_sandbox/config``."""

    model_config = ConfigDict(extra="forbid")

    latency_ms: int = Field(default=300, ge=0, description="Simulated generation time.")
    queue_ms: int = Field(default=0, ge=0, description="Time each request waits IN_QUEUE.")
    max_concurrent: int | None = Field(
        default=None,
        ge=1,
        description="fal's per-account concurrency: more requests wait IN_QUEUE.",
    )
    faults: list[FaultRule] = Field(default_factory=list)
    max_file_bytes: int = Field(
        default=512 * 1024 * 1024, ge=0, description="Memory for generated files (LRU)."
    )
    max_requests: int = Field(
        default=10_000, ge=1, description="Requests remembered for status and the ledger."
    )
    max_output_pixels: int = Field(
        default=80_000_000, ge=1, description="Largest image the sandbox will draw."
    )
    public_url: str | None = Field(
        default=None,
        description="Base URL that clients use for generated files (default: the URL the "
        "request came in on). Set it when the sandbox is reached under another name, e.g. "
        "inside a container.",
    )
