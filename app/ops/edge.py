"""The HTTP edge: a header deadline and a cap on open connections, which uvicorn lacks.

uvicorn (0.54) bounds neither how long a client may take to send its request headers (a
connection that sends half a request line, or nothing at all, stays open for ever: its
keep-alive timer is armed only after a first response) nor how many connections one process
holds (``limit_concurrency`` answers 503 to *requests* once the count is reached, so stalled
connections would shut out honest clients). :class:`EdgeProtocol` is uvicorn's httptools
protocol with both added, and one signal for the application (issue 15):

- **header deadline** (``FALGATE_HEADER_TIMEOUT_S``): from the moment a connection opens, or a
  keep-alive connection starts its next request, the complete request head must arrive within
  the deadline. A deadline counted from the first byte (not reset by each byte) also ends
  slow-drip ("slowloris") heads. A client that sent part of a request gets a ``408`` in the
  error envelope with ``Connection: close``; one that sent nothing is closed.
- **connection cap** (``FALGATE_MAX_CONNECTIONS``): when a new connection would exceed it, the
  oldest connection that is not serving a request (waiting for its headers, or idle between
  keep-alive requests) is closed to make room; if every connection is busy, the new one gets
  ``503`` and is closed. Stalled clients can therefore never keep a new one out.
- **disconnect signal**: each request's scope carries a :class:`DisconnectSignal`
  (``scope["extensions"]["falgate.disconnect"]``) that the edge fires when the connection is
  lost before the response completed, so the metered path can stop its work without a task
  per request waiting for ``http.disconnect``.

The body of a request is bounded by :class:`app.http.BodyLimitMiddleware`
(``FALGATE_BODY_TIMEOUT_S``), which reads every body and answers ``408`` when it stalls.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import resource
import time
from collections.abc import Callable
from typing import Any, ClassVar, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.errors import error_body
from app.ops.logging import new_request_id
from app.ops.metrics import Metrics
from app.settings import Settings

log = logging.getLogger("falgate.edge")

# Called with the reason a connection was closed by the edge: "header_timeout", "evicted",
# "over_capacity".
OnClose = Callable[[str], None]

#: The ASGI scope extension through which the edge tells a request that its client went away
#: (``scope["extensions"][DISCONNECT_EXTENSION]``, a :class:`DisconnectSignal`).
DISCONNECT_EXTENSION = "falgate.disconnect"


class DisconnectSignal:
    """One request's "the client went away" signal, given by the edge to the application.

    The alternative, a task per request blocked in ``receive()`` until ``http.disconnect``,
    costs a task's creation, scheduling and cancellation on every request; this costs a
    callback only when a client actually leaves. ``lost`` is true once the connection was lost
    before the response completed; :meth:`on_loss` sets the one callback to run then.
    """

    __slots__ = ("_callback", "lost")

    def __init__(self) -> None:
        self.lost = False
        self._callback: Callable[[], None] | None = None

    def on_loss(self, callback: Callable[[], None] | None) -> None:
        self._callback = callback

    def fire(self) -> None:
        self.lost = True
        callback, self._callback = self._callback, None
        if callback is not None:
            callback()


def _raw_response(status: int, reason: str, error_type: str, message: str) -> bytes:
    request_id = new_request_id()
    body = json.dumps(error_body(error_type, message, param=None, request_id=request_id))
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        f"x-request-id: {request_id}\r\n"
        "connection: close\r\n\r\n"
    )
    return (head + body).encode()


class EdgeProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a request-head deadline and a connection cap.

    Configure a subclass with :func:`edge_protocol` (uvicorn instantiates the class itself).
    """

    header_timeout_s: ClassVar[float] = 10.0
    max_connections: ClassVar[int] = 1000
    on_close: ClassVar[tuple[OnClose, ...]] = ()  # a tuple: a bare function would bind

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._opened = time.monotonic()
        self._head_timer: asyncio.TimerHandle | None = None
        self._got_bytes = False

    # --- the connection cap ---------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()
        if len(self.connections) > self.max_connections:
            self._make_room()

    def _idle(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _make_room(self) -> None:
        victims = [
            c
            for c in self.connections
            if c is not self
            and isinstance(c, EdgeProtocol)
            and c._idle()
            and not c.transport.is_closing()
        ]
        if victims:
            oldest = min(victims, key=lambda c: c._opened)
            oldest._close_quietly()
            self._count("evicted")
            return
        log.warning("connection refused: %d connections open, all busy", len(self.connections))
        self.transport.write(
            _raw_response(
                503,
                "Service Unavailable",
                "unavailable",
                "The gateway has too many open connections; try again.",
            )
        )
        self.transport.close()
        self._count("over_capacity")

    def _close_quietly(self) -> None:
        self._disarm_head_timer()
        self.transport.close()

    # --- the request-head deadline --------------------------------------------
    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def data_received(self, data: bytes) -> None:
        if data:
            self._got_bytes = True
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_head_timer()  # a keep-alive connection's next request (no-op for the first)

    def on_headers_complete(self) -> None:
        self._disarm_head_timer()
        self._got_bytes = False
        # The scope dict becomes the request's (uvicorn builds it in on_message_begin).
        scope = cast(dict[str, Any], self.scope)
        scope.setdefault("extensions", {})[DISCONNECT_EXTENSION] = DisconnectSignal()
        super().on_headers_complete()

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if not self._idle():
            # A pipelined head behind a request still being served: look again later.
            self._arm_head_timer()
            return
        if self._got_bytes:
            self.transport.write(
                _raw_response(
                    408,
                    "Request Timeout",
                    "request_timeout",
                    f"The request headers did not arrive within {self.header_timeout_s:g} s.",
                )
            )
        self.transport.close()
        self._count("header_timeout")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        cycle = self.cycle
        super().connection_lost(exc)
        if cycle is not None and not cycle.response_complete:
            signal = cycle.scope.get("extensions", {}).get(DISCONNECT_EXTENSION)
            if isinstance(signal, DisconnectSignal):
                signal.fire()

    def _count(self, reason: str) -> None:
        for callback in self.on_close:
            with contextlib.suppress(Exception):
                callback(reason)


def edge_protocol(
    *, header_timeout_s: float, max_connections: int, on_close: OnClose | None = None
) -> type[EdgeProtocol]:
    """An :class:`EdgeProtocol` class with these limits, for ``uvicorn.Config(http=...)``."""
    return type(
        "ConfiguredEdgeProtocol",
        (EdgeProtocol,),
        {
            "header_timeout_s": header_timeout_s,
            "max_connections": max_connections,
            "on_close": () if on_close is None else (on_close,),
        },
    )


def raise_open_file_limit(wanted: int) -> None:
    """Lift the soft open-file limit towards ``wanted`` (bounded by the hard limit), so that
    the connection cap, not ``EMFILE``, is what limits connections; warn if it cannot."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.warning(
            "the open-file limit (%d) is below FALGATE_MAX_CONNECTIONS plus headroom (%d): "
            "lower FALGATE_MAX_CONNECTIONS or raise 'ulimit -n'",
            soft,
            wanted,
        )


def edge_options(settings: Settings, metrics: Metrics) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.run``: the edge protocol, keep-alive timeout, and no
    ``limit_concurrency`` (the edge's connection cap replaces it)."""
    raise_open_file_limit(settings.max_connections + 256)
    return {
        "http": edge_protocol(
            header_timeout_s=settings.header_timeout_s,
            max_connections=settings.max_connections,
            on_close=metrics.record_edge_close,
        ),
        "timeout_keep_alive": settings.keep_alive_timeout_s,
    }
