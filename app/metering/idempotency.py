"""``Idempotency-Key`` on POSTs, with Stripe's semantics.

Scope and lifetime: per API key, for ``FALGATE_IDEMPOTENCY_TTL_S`` (24 h) after the first
request completed.

- The first request records ``(key, Idempotency-Key, sha256(method, path, body))`` as *in
  progress* atomically; it alone goes on to fal.
- A replay of a completed request gets the first response back (status, body, headers, plus
  ``Idempotent-Replayed: true``) without touching fal or the budget.
- The same Idempotency-Key with a different method, path or body -> 409
  ``idempotency_conflict``.
- **A concurrent duplicate** (the first is still in flight) **waits** for the first to finish,
  polling, and then gets its response; if the first is not finished within the wait timeout
  (by default as long as a request may take: queue timeout + upstream request timeout) it gets
  409 ``idempotency_conflict`` saying the first is still in progress. A duplicate never
  reaches fal while the first may still be running.
- **Only successful (2xx) responses are stored.** Any error (4xx or 5xx) frees the key so a
  retry is evaluated afresh. Unlike Stripe, which keeps 4xx results of requests that started
  executing, nothing here charges on an error (the hold is released), and the typical 4xx
  (402 budget, 429 rate limit, 400 from fal) can succeed on a later retry once the budget is
  raised or the limit has passed, which is what a client retrying with the same key wants.
- **A retry never runs a job fal already has.** The record names the first attempt's gateway
  request id, and that request's record (``GET /v1/requests/{id}``) tells what became of it: a
  retry whose first attempt completed gets the response rebuilt from it (also when the first
  response could not be stored, and whichever process handles the retry); one whose first
  attempt is still pending or unresolved (fal accepted it; its process may have died) waits
  for the resolver to settle it, then gets that outcome; one whose first attempt failed, or
  never reached admission before its process died, runs afresh. In-progress records live as
  long as completed ones (``FALGATE_IDEMPOTENCY_TTL_S``), so nothing re-runs by expiry.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from app.errors import IdempotencyConflict, InvalidRequest
from app.metering import keyspace
from app.metering.lua import LuaScript, store_errors, text
from app.metering.meter import Meter, RequestRecord

MAX_KEY_LENGTH = 255
#: Printable ASCII, no space at either end (HTTP would strip it anyway): the document's pattern.
KEY_PATTERN = r"^[\x21-\x7E](?:[\x20-\x7E]*[\x21-\x7E])?$"
REPLAYED_HEADER = "Idempotent-Replayed"


@dataclass(frozen=True)
class StoredResponse:
    """The first request's response, to be sent again."""

    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class IdempotencyTicket:
    """Proof that this request is the first with its Idempotency-Key: finish it with
    :meth:`IdempotencyStore.complete` or :meth:`IdempotencyStore.abandon`."""

    record: str
    request_id: str


def fingerprint(method: str, path: str, body: bytes) -> str:
    digest = hashlib.sha256()
    digest.update(method.upper().encode())
    digest.update(b"\n")
    digest.update(path.encode())
    digest.update(b"\n")
    digest.update(body)
    return digest.hexdigest()


def check_key(idempotency_key: str) -> str:
    value = idempotency_key
    if len(value) > MAX_KEY_LENGTH or re.match(KEY_PATTERN, value) is None:
        raise InvalidRequest(
            f"Idempotency-Key must be 1..{MAX_KEY_LENGTH} printable ASCII characters.",
            param="Idempotency-Key",
        )
    return value


class IdempotencyStore:
    """Records first requests, stores their successful responses, replays them."""

    def __init__(
        self,
        meter: Meter,
        *,
        wait_timeout_s: float | None = None,
        poll_interval_s: float = 0.05,
    ) -> None:
        redis, settings, process_id = meter.redis, meter.settings, meter.process_id
        self.meter = meter
        self.redis = redis
        self.settings = settings
        self.process_id = process_id
        if wait_timeout_s is None:
            wait_timeout_s = settings.upstream_queue_timeout_s + settings.upstream_request_timeout_s
        self.wait_timeout_s = wait_timeout_s
        self.poll_interval_s = poll_interval_s
        # As long as a completed record: an in-progress one is resolved from its first
        # attempt's request record, never by expiring (which would let a retry run again).
        self.in_progress_ttl_ms = int(settings.idempotency_ttl_s * 1000)
        self.lease_ms = int(settings.process_lease_s * 1000)
        self._script = LuaScript(redis, __package__, "idempotency.lua")

    async def begin(
        self,
        *,
        key_id: str,
        idempotency_key: str,
        method: str,
        path: str,
        body: bytes,
        request_id: str,
    ) -> IdempotencyTicket | StoredResponse | RequestRecord:
        """A ticket (this is the first request: go ahead), the response to replay, or the
        completed first attempt's request record (to rebuild its response from).

        Raises ``IdempotencyConflict`` for a different body, or when the first request is still
        in flight after the wait timeout.
        """
        record = keyspace.idempotency(key_id, check_key(idempotency_key))
        print_ = fingerprint(method, path, body)
        deadline = time.monotonic() + self.wait_timeout_s
        take_over = ""
        while True:
            with store_errors():
                reply = await self._script(
                    [record],
                    [
                        "begin",
                        print_,
                        request_id,
                        self.process_id,
                        self.in_progress_ttl_ms,
                        take_over,
                    ],
                )
            state = text(reply[0])
            if state == "new":
                return IdempotencyTicket(record=record, request_id=request_id)
            if state == "conflict":
                raise IdempotencyConflict(
                    "This Idempotency-Key was already used with a different request body.",
                    param="Idempotency-Key",
                )
            if state == "done":
                return StoredResponse(
                    status=int(text(reply[1])),
                    body=base64.b64decode(text(reply[2])),
                    headers={**json.loads(text(reply[3])), REPLAYED_HEADER: "true"},
                )
            owner_request, owner_process, age_ms = text(reply[1]), text(reply[2]), int(reply[3])
            take_over = ""
            first = await self.meter.request_record(key_id, owner_request)
            if first is not None and first.status == "completed":
                return first
            if first is not None and first.resolved:
                take_over = owner_request  # it failed: charged nothing, a retry runs afresh
                continue
            if first is None and age_ms >= self.lease_ms and not await self._alive(owner_process):
                take_over = owner_request  # its process died before admitting it
                continue
            if time.monotonic() >= deadline:
                raise IdempotencyConflict(
                    "A request with this Idempotency-Key is still in progress; retry later.",
                    param="Idempotency-Key",
                    headers={"Retry-After": "1"},
                )
            await asyncio.sleep(self.poll_interval_s)

    async def _alive(self, process_id: str) -> bool:
        with store_errors():
            return bool(await self.redis.exists(keyspace.process_lease(process_id)))

    async def complete(
        self, ticket: IdempotencyTicket, status: int, body: bytes, headers: Mapping[str, str]
    ) -> None:
        """Store a 2xx response for replays; any other status frees the key instead."""
        if not 200 <= status < 300:
            await self.abandon(ticket)
            return
        with store_errors():
            await self._script(
                [ticket.record],
                [
                    "complete",
                    ticket.request_id,
                    status,
                    base64.b64encode(body).decode(),
                    json.dumps(dict(headers)),
                    self.settings.idempotency_ttl_s * 1000,
                ],
            )

    async def abandon(self, ticket: IdempotencyTicket) -> None:
        """Free the key (the first attempt failed): a retry runs afresh."""
        with store_errors():
            await self._script([ticket.record], ["abandon", ticket.request_id])
