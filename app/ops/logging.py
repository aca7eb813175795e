"""JSON logs, one object per line on stdout, and the request-context middleware.

:class:`RequestContextMiddleware` (pure ASGI) gives every HTTP request its id, returns it in
``X-Request-Id``, records the request metrics and writes exactly one access line per request on
the ``falgate.access`` logger. Route handlers tell it what they learned by setting these
attributes on ``request.state`` (all optional):

=========================  =======  ===================================================
``request.state.``         type     meaning
=========================  =======  ===================================================
``request_id``             str      set by the middleware; read it with
                                    ``app.errors.request_id_of(request)``
``key_id``                 str      the gateway key's id (never the key itself)
``model``                  str      the catalog id served (also the metrics ``model`` label:
                                    set it only once the model is known to the catalog)
``cost_micro``             int      what was charged, in micro-dollars
``upstream_request_id``    str      fal's request id
``prompt``                 str      logged only when ``FALGATE_LOG_PROMPTS`` is true
=========================  =======  ===================================================

Secrets never reach the logs: no header is logged, and every line is scrubbed of gateway keys
(``fgk_...``), ``Bearer``/``Key`` credentials and the configured admin token, fal key and
Redis password, as a second line of defence.
"""

from __future__ import annotations

import asyncio
import logging
import logging.config
import re
import time
import uuid
from collections.abc import Iterable
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import fastapi.routing
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import fastjson
from app.money import format_usd
from app.ops.metrics import Metrics, bind_metrics, metrics_of, unbind_metrics
from app.settings import Settings

access_log = logging.getLogger("falgate.access")

REQUEST_ID_HEADER = "X-Request-Id"
CLIENT_REQUEST_ID_HEADER = "X-Client-Request-Id"
# A client's own correlation id (SPEC section 10): at most 128 printable ASCII characters. It
# is echoed and logged, never an id of state: every id that keys state is the gateway's own.
_CLIENT_REQUEST_ID = re.compile(r"[\x20-\x7e]{1,128}")

# Attributes every LogRecord has; anything else on a record came in through ``extra=``.
_RECORD_ATTRS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()
    | {"message", "asctime", "color_message"}  # uvicorn's copy of msg with terminal colours
)
_SECRET_PATTERNS = (
    (re.compile(r"fgk_[A-Za-z0-9_\-]+"), "fgk_[redacted]"),
    # A Sapiom transaction id authenticates one request: keep the key id, blank the secret.
    (re.compile(r"(stx_key_[A-Za-z0-9]+_)[0-9a-f]{32}"), r"\1[redacted]"),
    # An Authorization value: the scheme, then a credential-like token (not "key is set").
    (re.compile(r"\b([Bb]earer|[Kk]ey)\s+[A-Za-z0-9._~+/:=-]{16,}"), r"\1 [redacted]"),
)
# Whether a line may hold anything ``_SECRET_PATTERNS`` rewrites (a superset of their matches):
# one scan of the line, without the word-boundary tests that make the last pattern slow.
_MAYBE_SECRET = re.compile(r"fgk_|stx_key_|earer\s|ey\s")
_MIN_SECRET_LEN = 4

# The id of the request being served, so that every line logged while serving it carries it.
_current_request_id: ContextVar[str | None] = ContextVar("falgate_request_id", default=None)


def new_request_id() -> str:
    return f"req_{uuid.uuid4().hex}"


def client_request_id(value: str | None) -> str | None:
    """The client's ``X-Request-Id`` when valid; raises ``ValueError`` when it is not."""
    if value is None:
        return None
    if not _CLIENT_REQUEST_ID.fullmatch(value):
        raise ValueError(value)
    return value


def _lean_records() -> None:
    """Records without what no JSON line shows: the caller's file and line (a walk of the
    stack per record), thread, process and multiprocessing names (logging HOWTO,
    "Optimization"). Set where the JSON formatter is installed, i.e. in every server process."""
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


class BatchedStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A ``StreamHandler`` that flushes at most every ``interval_s`` on an event loop, and
    writes the lines of the loggers named in ``batched`` (the access line: one per request)
    then too, formatted together: under load one write carries the lines of many requests,
    instead of a system call per line (stdout is unbuffered under ``PYTHONUNBUFFERED``, as in
    the Docker image) and formatting work between the requests' other work.

    Any other line is written at once, after the waiting ones, so the order is kept and a
    process that ends (uvicorn re-raises SIGTERM after its last line) loses none of them. A
    waiting record keeps what it would have been formatted with: it waits only when its
    arguments are plain values and it carries no traceback, and it takes the id of the request
    being served along. Extra fields are kept by reference, as ``QueueHandler`` keeps them.
    Lines of ``WARNING`` and above, and lines logged where no event loop runs (another thread,
    start-up, the CLI), are flushed at once; ``logging.shutdown`` writes the rest at exit.
    """

    def __init__(
        self, stream: Any = None, interval_s: float = 0.02, batched: Iterable[str] = ()
    ) -> None:
        super().__init__(stream)
        self.interval_s = interval_s
        self.batched = frozenset(batched)
        self._flush_due: float | None = None  # when the scheduled flush should have run
        self._waiting: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            loop = _running_loop()
            if (
                loop is not None
                and record.name in self.batched
                and record.levelno < logging.WARNING
                and _can_wait(record)
            ):
                record._falgate_request_id = _current_request_id.get()
                self._waiting.append(record)
            else:
                self._write_waiting()
                self.stream.write(self.format(record) + self.terminator)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)
            return
        if loop is None or record.levelno >= logging.WARNING:
            self.flush()
            return
        due = self._flush_due
        if due is not None and time.monotonic() < due + 1.0:
            return  # a flush is scheduled (one more than a second late: its loop is gone)
        self._flush_due = time.monotonic() + self.interval_s
        loop.call_later(self.interval_s, self._scheduled_flush)

    def _write_waiting(self) -> None:
        waiting, self._waiting = self._waiting, []
        lines = []
        for record in waiting:
            try:
                lines.append(self.format(record) + self.terminator)
            except Exception:
                self.handleError(record)
        if lines:
            self.stream.write("".join(lines))

    def _scheduled_flush(self) -> None:
        self.flush()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]  # emit runs under it (Handler.handle)
            self._flush_due = None
            self._write_waiting()
            super().flush()


_PLAIN = (str, int, float, bool, type(None))


def _can_wait(record: logging.LogRecord) -> bool:
    """Whether formatting ``record`` later gives the line it would give now."""
    if record.exc_info or record.exc_text or record.stack_info or type(record.msg) is not str:
        return False
    args = record.args
    return not args or (isinstance(args, tuple) and all(type(a) in _PLAIN for a in args))


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object: ``ts``, ``level``, ``logger``, ``msg``, the
    record's ``extra`` fields and ``exc`` (the traceback) when there is one."""

    def __init__(self, redact: Iterable[str] = ()) -> None:
        super().__init__()
        _lean_records()
        # Match the secrets as they appear inside a JSON string (quotes, backslashes escaped).
        self._redact = sorted(
            {fastjson.dumps(s).decode()[1:-1] for s in redact if len(s) >= _MIN_SECRET_LEN},
            key=len,
            reverse=True,
        )

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = vars(record)
        # A record formatted after it was logged (BatchedStreamHandler) carries the id of the
        # request it was logged in, or None: not that of whichever request is served now.
        if "_falgate_request_id" in fields:
            request_id = fields["_falgate_request_id"]
        else:
            request_id = _current_request_id.get()
        if request_id is not None:
            data["request_id"] = request_id
        for name, value in fields.items():
            if name not in _RECORD_ATTRS and not name.startswith("_"):
                data[name] = value
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            data["exc"] = record.exc_text
        return self.scrub(fastjson.dumps(data).decode())

    def scrub(self, line: str) -> str:
        for secret in self._redact:
            line = line.replace(secret, "[redacted]")
        if _MAYBE_SECRET.search(line):
            for pattern, replacement in _SECRET_PATTERNS:
                line = pattern.sub(replacement, line)
        return line


def secrets_of(settings: Settings) -> list[str]:
    """The configured secret values the log formatter blanks out wherever they appear."""
    found: list[str] = []
    for secret in (settings.admin_token, settings.fal_key):
        if secret is not None and secret.get_secret_value():
            found.append(secret.get_secret_value())
    if settings.redis_url:
        parts = urlsplit(settings.redis_url.split(",")[0])
        if parts.password:
            found.append(unquote(parts.password))
        query = dict(parse_qsl(urlsplit(settings.redis_url).query))
        for name in ("password", "sentinel_password"):
            if query.get(name):
                found.append(query[name])
    return found


def logging_config(settings: Settings) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for the whole process, uvicorn's loggers included.

    Pass it to uvicorn as ``log_config`` together with ``access_log=False``: the access line is
    written by :class:`RequestContextMiddleware`, not by uvicorn.
    """
    level = settings.log_level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "json": {"()": f"{__name__}.JsonFormatter", "redact": secrets_of(settings)},
        },
        "handlers": {
            "stdout": {
                "class": f"{__name__}.BatchedStreamHandler",
                "formatter": "json",
                "stream": "ext://sys.stdout",
                "batched": [access_log.name],
            },
        },
        "root": {"handlers": ["stdout"], "level": level},
        "loggers": {
            "uvicorn": {"handlers": [], "propagate": True, "level": level},
            "uvicorn.error": {"handlers": [], "propagate": True, "level": level},
            "uvicorn.access": {"handlers": [], "propagate": False, "level": "WARNING"},
            # httpx logs every request at INFO; the access line already says what matters.
            "httpx": {"handlers": [], "propagate": True, "level": "WARNING"},
            "httpcore": {"handlers": [], "propagate": True, "level": "WARNING"},
        },
    }


def configure_logging(settings: Settings) -> None:
    """Send every log record, as JSON, to stdout."""
    logging.config.dictConfig(logging_config(settings))


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.Config``/``uvicorn.run`` besides the app, host and port:
    JSON logs, no uvicorn access log (ours is written by the middleware), graceful shutdown."""
    return {
        "log_config": logging_config(settings),
        "access_log": False,
        "timeout_graceful_shutdown": settings.shutdown_grace_s,
    }


def _route_template(scope: Scope) -> str:
    route = scope.get("route")
    if route is None:
        route = _match_route(scope)
    if route is None:
        return "<unmatched>"
    template = getattr(route, "path_format", None) or getattr(route, "path", None)
    return str(template) if template else "<unmatched>"


def _match_route(scope: Scope) -> Any:
    """The route a request would have reached, for requests answered before routing (a body
    that was too large, stalled, or abandoned by its client)."""
    app = scope.get("app")
    routes = getattr(app, "routes", ())
    flatten = getattr(fastapi.routing, "iter_route_contexts", None)  # FastAPI >= 0.16x
    candidates = list(flatten(routes)) if flatten is not None else list(routes)
    partial = None
    path = scope.get("path", "")
    for route in candidates:
        regex = getattr(route, "path_regex", None)
        if regex is None or not regex.match(path):
            continue
        methods = getattr(route, "methods", None)
        if not methods or scope.get("method") in methods:
            return route
        partial = partial or route
    return partial


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _invalid_client_request_id(request_id: str) -> ASGIApp:
    """The 400 for an ``X-Request-Id`` that is not 1..128 printable ASCII characters."""
    body = fastjson.dumps(
        {
            "error": {
                "type": "invalid_request",
                "message": "X-Request-Id must be 1..128 printable ASCII characters.",
                "param": "X-Request-Id",
                "request_id": request_id,
            }
        }
    )

    async def answer(scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 400,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return answer


class RequestContextMiddleware:
    """Request id, ``X-Request-Id`` response header, request metrics and the access line.

    Add it last (``app.add_middleware`` puts the last one outermost) so that it sees every
    response, including those of the other middlewares.
    """

    def __init__(self, app: ASGIApp, *, settings: Settings, metrics: Metrics | None = None):
        """``metrics`` defaults to the app's own (``app.state.metrics``)."""
        self.app = app
        self.log_prompts = settings.log_prompts
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        request_id = new_request_id()
        state: dict[str, Any] = scope.setdefault("state", {})
        state["request_id"] = request_id
        status = 500  # unless a response starts
        responded = client_left = False
        started = time.perf_counter()
        try:
            client_id = client_request_id(_header(scope, b"x-request-id"))
        except ValueError:
            client_id = None
            app: ASGIApp = _invalid_client_request_id(request_id)
        else:
            app = self.app
        state["client_request_id"] = client_id

        async def receive_watching() -> Message:
            nonlocal client_left
            message = await receive()
            if message["type"] == "http.disconnect":
                client_left = True
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal status, responded
            if message["type"] == "http.response.start":
                responded = True
                status = int(message["status"])
                headers = MutableHeaders(scope=message)
                if REQUEST_ID_HEADER not in headers:
                    headers.append(REQUEST_ID_HEADER, request_id)
                if client_id is not None:
                    headers.append(CLIENT_REQUEST_ID_HEADER, client_id)
            await send(message)

        if self.metrics is None and "app" in scope:
            self.metrics = metrics_of(scope["app"])
        token = bind_metrics(self.metrics) if self.metrics is not None else None
        rid_token = _current_request_id.set(request_id)
        try:
            await app(scope, receive_watching, send_with_id)
        except BaseException as exc:
            if not isinstance(exc, Exception):  # cancelled: the client or the server went away
                status = 499
            raise
        finally:
            if client_left and not responded:  # gone before any answer (e.g. mid-body)
                status = 499
            elapsed = time.perf_counter() - started
            self._finish(scope, state, status, elapsed)
            _current_request_id.reset(rid_token)
            if token is not None:
                unbind_metrics(token)

    def _finish(self, scope: Scope, state: dict[str, Any], status: int, elapsed: float) -> None:
        route = _route_template(scope)
        model = state.get("model")
        if self.metrics is not None:
            self.metrics.observe_request(
                route=route,
                method=scope["method"],
                status=status,
                model=model,
                seconds=elapsed,
            )
        cost = state.get("cost_micro")
        fields: dict[str, Any] = {
            "request_id": state["request_id"],
            "method": scope["method"],
            "path": scope["path"],
            "route": route,
            "status": status,
            "latency_ms": round(elapsed * 1000, 1),
            "key_id": state.get("key_id"),
            "model": model,
            "cost_usd": format_usd(cost) if isinstance(cost, int) else None,
            "upstream_request_id": state.get("upstream_request_id"),
            "client_request_id": state.get("client_request_id"),
            "client": scope["client"][0] if scope.get("client") else None,
        }
        if self.log_prompts and state.get("prompt") is not None:
            fields["prompt"] = state["prompt"]
        access_log.info("%s %s %s", scope["method"], scope["path"], status, extra=fields)
