"""The HTTP side of ``Idempotency-Key``: wrap a POST handler so that replays are answered from
the store and only the first request runs (semantics in :mod:`app.metering.idempotency`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from fastapi import Request, Response

from app.errors import Unavailable, request_id_of
from app.metering.idempotency import (
    REPLAYED_HEADER,
    IdempotencyStore,
    IdempotencyTicket,
    StoredResponse,
)
from app.metering.meter import RequestRecord

log = logging.getLogger("falgate.idempotency")

IDEMPOTENCY_HEADER = "Idempotency-Key"
#: Headers of the first response that a replay repeats.
_REPLAYED = (
    "content-type",
    "x-request-id",
    "x-cost-usd",
    "x-budget-remaining-usd",
)


def idempotency_store(request: Request) -> IdempotencyStore:
    """The app's store (created on first use from the lifespan's meter)."""
    state = request.app.state
    store: IdempotencyStore | None = getattr(state, "idempotency", None)
    if store is None:
        store = IdempotencyStore(state.meter)
        state.idempotency = store
    return store


async def idempotent(
    request: Request,
    key_id: str,
    handler: Callable[[], Awaitable[Response]],
    replay: Callable[[RequestRecord], Response],
) -> Response:
    """Run ``handler`` once per (key, Idempotency-Key); without the header just run it.

    ``replay`` rebuilds the response of a first attempt that completed from its request record
    (when its own response was never stored).
    """
    idempotency_key = request.headers.get(IDEMPOTENCY_HEADER)
    if idempotency_key is None:
        return await handler()
    store = idempotency_store(request)
    started = await store.begin(
        key_id=key_id,
        idempotency_key=idempotency_key,
        method=request.method,
        path=request.url.path,
        body=await request.body(),
        request_id=request_id_of(request),
    )
    if isinstance(started, StoredResponse):
        return Response(
            content=started.body,
            status_code=started.status,
            headers=started.headers,
        )
    if isinstance(started, RequestRecord):
        response = replay(started)
        response.headers[REPLAYED_HEADER] = "true"
        return response
    return await _first(store, started, handler)


async def _first(
    store: IdempotencyStore, ticket: IdempotencyTicket, handler: Callable[[], Awaitable[Response]]
) -> Response:
    try:
        response = await handler()
    except BaseException:
        # Failed or cancelled before a response: free the key (shielded: also on cancellation).
        await asyncio.shield(store.abandon(ticket))
        raise
    body = getattr(response, "body", None)
    if not isinstance(body, bytes):
        await asyncio.shield(store.abandon(ticket))
        return response
    headers = {k: v for k, v in response.headers.items() if k.lower() in _REPLAYED}
    try:
        await asyncio.shield(store.complete(ticket, response.status_code, body, headers))
    except Unavailable:
        # The work is done and charged: answer it. A retry finds the record in progress and
        # rebuilds this response from the request record, rather than running twice.
        log.warning("could not store the idempotent response of %s", ticket.request_id)
    return response
