"""fal's HTTP API, spoken in httpx requests over one pooled transport: queue protocol by default,
sync optional.

Every failure leaves here as one of the gateway's own errors (SPEC section 6):

- fal 400/404/422 (the model refused the input)   -> ``InvalidRequest`` with fal's message
- fal 401/403 (our central key or account)        -> ``Unavailable``, generic message
- fal 5xx, unreachable, 429 after the retries     -> ``UpstreamError``
- our deadline, fal 504, read timeouts            -> ``UpstreamTimeout``

Connect errors, 429, 502, 503 and 504 are retried with exponential backoff, except a 504 that
fal marks ``X-Fal-Request-Timeout-Type: user`` (our own start deadline). Other transport errors,
read timeouts and 500s are retried only for requests that are safe to repeat (status, result,
cancel): re-sending a submit or a sync run that may have reached fal could generate (and bill)
twice. Once fal accepted a job, a call that gives up tells fal to cancel it first.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Literal, Self

import httpx

from app import fastjson
from app.errors import (
    FalgateError,
    InvalidRequest,
    Unavailable,
    UpstreamError,
    UpstreamTimeout,
)
from app.ops.metrics import observe_upstream
from app.settings import Settings
from app.upstream.transport import AiohttpTransport, UpstreamHTTP, upstream_http
from app.upstream.types import (
    GeneratedImage,
    OnSubmitted,
    OutcomeState,
    UpstreamCall,
    UpstreamOutcome,
    UpstreamResult,
)

log = logging.getLogger("falgate.upstream")

_RETRY_STATUSES = frozenset({429, 502, 503, 504})
# A status or result call repeats nothing: a 500 there is retried too, as are read timeouts.
_RETRY_STATUSES_REPEATABLE = _RETRY_STATUSES | {500}
_VALIDATION_STATUSES = frozenset({400, 404, 422})
_NAMESPACES = ("workflows", "comfy")
_MAX_BACKOFF_S = 10.0
_CANCEL_TIMEOUT_S = 10.0
_FIRST_POLL_S = 0.01
_SSE_HEADERS = {"Accept": "text/event-stream"}
_UNAVAILABLE = "The image generation service is temporarily unavailable."
# Upstream latency metric outcomes, by the error a call ended with.
_OUTCOMES: dict[type[FalgateError], str] = {
    InvalidRequest: "invalid",
    Unavailable: "unavailable",
    UpstreamTimeout: "timeout",
}

Phase = Literal["run", "submit", "status", "result", "cancel"]


@functools.lru_cache(maxsize=512)
def _model_url(url: str) -> httpx.URL:
    """A model's run or submit URL, parsed once: httpx parses a URL given as a string on every
    request (~20 µs here, a good part of the client's own cost per call). Bounded: one entry
    per model and protocol; status and result URLs hold a request id and are never reused."""
    return httpx.URL(url)


def app_path(endpoint: str) -> str:
    """``fal-ai/flux/dev`` -> ``fal-ai/flux``: fal's status/result/cancel URLs drop the path."""
    parts = endpoint.strip("/").split("/")
    keep = 3 if parts[0] in _NAMESPACES else 2
    if len(parts) < keep:
        raise InvalidRequest(f"'{endpoint}' is not a fal endpoint id (owner/app[/path]).")
    return "/".join(parts[:keep])


def render_detail(detail: Any) -> str:
    """fal's ``detail`` (a string, or FastAPI's list of ``{loc, msg, type}``) as one line."""
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, Mapping):
                loc = [str(p) for p in item.get("loc") or () if p != "body"]
                msg = str(item.get("msg", "is invalid"))
                parts.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
            else:
                parts.append(str(item))
        return "; ".join(parts)
    if detail is None:
        return ""
    return str(detail)


def _last_event(text: str) -> Mapping[str, Any] | None:
    """The last ``data:`` JSON object of a server-sent-events body (fal's status stream)."""
    last: Mapping[str, Any] | None = None
    for line in text.splitlines():
        if line.startswith("data:"):
            try:
                value = fastjson.loads(line[5:])
            except ValueError:
                continue
            if isinstance(value, Mapping):
                last = value
    return last


def _body_of(response: httpx.Response) -> Any:
    try:
        return fastjson.loads(response.content)  # orjson: httpx's .json() is the stdlib's
    except ValueError:
        return None


def _detail_of(response: httpx.Response) -> str:
    body = _body_of(response)
    if isinstance(body, Mapping):
        text = render_detail(body.get("detail") or body.get("message") or body.get("error"))
    else:
        text = response.text.strip()
    return text[:500]


def _is_user_timeout(response: httpx.Response) -> bool:
    return response.status_code == 504 and (
        response.headers.get("x-fal-request-timeout-type", "").lower() == "user"
    )


def error_for(response: httpx.Response, phase: Phase) -> FalgateError:
    """The gateway error for a failed fal answer; never repeats fal's auth/account wording."""
    status = response.status_code
    if status in (401, 403):
        # The body names our key or our balance; neither goes to a client or a log line.
        log.error("fal refused the gateway's credentials (HTTP %d)", status)
        return Unavailable(_UNAVAILABLE)
    detail = _detail_of(response)
    if status in _VALIDATION_STATUSES and phase in ("run", "submit", "result"):
        if status == 404 and phase == "result":
            return UpstreamError("fal no longer has the result of this request.")
        return InvalidRequest(f"fal rejected the request: {detail or f'HTTP {status}'}")
    if status == 504:
        return UpstreamTimeout(f"fal timed out ({detail or 'HTTP 504'}).")
    if status == 429:
        return UpstreamError("fal is rate limiting the gateway; try again shortly.")
    suffix = f": {detail}" if detail else ""
    return UpstreamError(f"fal answered HTTP {status} during {phase}{suffix}")


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def parse_result(body: Any, request_id: str | None) -> UpstreamResult:
    """fal's output (``images[]`` or a single ``image``) as an :class:`UpstreamResult`.

    Width/height stay ``None`` where fal omits them (topaz); the caller fills them in.
    """
    if not isinstance(body, dict):
        raise UpstreamError("fal returned an unexpected response.")
    raw_images = body.get("images")
    if raw_images is None and isinstance(body.get("image"), Mapping):
        raw_images = [body["image"]]
    if not isinstance(raw_images, list) or not raw_images:
        raise UpstreamError("fal returned no images.")
    images = []
    for raw in raw_images:
        if not isinstance(raw, Mapping) or not isinstance(raw.get("url"), str):
            raise UpstreamError("fal returned an image without a URL.")
        content_type = raw.get("content_type")
        images.append(
            GeneratedImage(
                url=raw["url"],
                width=_int_or_none(raw.get("width")),
                height=_int_or_none(raw.get("height")),
                content_type=content_type if isinstance(content_type, str) else None,
            )
        )
    return UpstreamResult(
        request_id=request_id, images=images, seed=_int_or_none(body.get("seed")), body=body
    )


class FalClient:
    """The gateway's one connection to fal (or the sandbox), built from :class:`Settings`.

    Open it with ``await start()`` (or ``async with``) and close it with ``aclose()``; the
    gateway's lifespan owns it. ``transport`` exists for tests and special networking.
    """

    def __init__(
        self, settings: Settings, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self._settings = settings
        self._transport = transport
        self._http: UpstreamHTTP | None = None
        self._run_url = settings.fal_run_url.rstrip("/")
        self._queue_url = settings.fal_queue_url.rstrip("/")

    # --- life cycle --------------------------------------------------------
    async def start(self) -> None:
        """Create the pooled HTTP client. Idempotent."""
        if self._http is not None:
            return
        s = self._settings
        key = s.fal_key.get_secret_value() if s.fal_key is not None else ""
        # The sandbox takes any key; a real fal without a key answers 401 -> Unavailable.
        credentials = key or "sandbox"
        limits = httpx.Limits(
            max_connections=max(s.upstream_max_concurrent * 2, 10),
            max_keepalive_connections=max(s.upstream_max_concurrent, 10),
            # Shorter than servers' idle timeouts (uvicorn's is 5 s, like httpx's default),
            # so a pooled connection is never reused just as the server closes it: a POST
            # lost that way cannot safely be retried.
            keepalive_expiry=2.0,
        )
        transport = self._transport
        if transport is None and s.upstream_transport == "aiohttp":
            # httpx stays the interface; aiohttp's pool and parser move the bytes (issue 15).
            transport = AiohttpTransport(limits=limits)
        self._http = upstream_http(
            transport,
            headers={"Authorization": f"Key {credentials}", "User-Agent": "falgate"},
            timeout=httpx.Timeout(
                connect=s.upstream_connect_timeout_s,
                read=s.upstream_read_timeout_s,
                write=s.upstream_read_timeout_s,
                pool=s.upstream_connect_timeout_s,
            ),
            limits=limits,
        )

    async def aclose(self) -> None:
        """Close the pooled client."""
        if self._http is not None:
            http, self._http = self._http, None
            await http.aclose()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # --- public API --------------------------------------------------------
    async def run(
        self,
        call: UpstreamCall,
        *,
        on_submitted: OnSubmitted | None = None,
        timeout_s: float | None = None,
    ) -> UpstreamResult:
        """Generate with fal and return its output.

        Queue protocol (default): submit, ``await on_submitted(request_id)``, poll the status,
        fetch the result. If the caller is cancelled (client went away) or ``timeout_s``
        (default ``upstream_request_timeout_s``) passes, fal is told to cancel the request
        before ``CancelledError``/``UpstreamTimeout`` propagates; the same happens when
        ``on_submitted`` raises. Sync protocol (``upstream_mode == "sync"``): one ``POST`` to
        ``fal_run_url``; ``on_submitted`` is not called since fal's id only arrives with the
        result, and dropping the connection is how fal is told to stop.
        """
        started = time.monotonic()
        outcome = "error"
        try:
            result = await self._run(call, on_submitted, timeout_s)
            outcome = "ok"
            return result
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except FalgateError as exc:
            outcome = _OUTCOMES.get(type(exc), "error")
            raise
        finally:
            observe_upstream(call.endpoint, outcome, time.monotonic() - started)

    async def _run(
        self, call: UpstreamCall, on_submitted: OnSubmitted | None, timeout_s: float | None
    ) -> UpstreamResult:
        deadline = timeout_s if timeout_s is not None else self._settings.upstream_request_timeout_s
        if self._settings.upstream_mode == "sync":
            try:
                async with asyncio.timeout(deadline):
                    return await self._run_sync(call)
            except TimeoutError as exc:
                raise UpstreamTimeout(f"fal did not answer within {deadline:g}s.") from exc

        submitted: list[str] = []
        try:
            async with asyncio.timeout(deadline):
                return await self._run_queued(call, on_submitted, submitted)
        except TimeoutError as exc:
            if submitted:
                await asyncio.shield(self._cancel_quietly(call.endpoint, submitted[0]))
            raise UpstreamTimeout(f"fal did not finish within {deadline:g}s.") from exc
        except (asyncio.CancelledError, FalgateError):
            # Given up (client gone, status or result unavailable): fal must not go on working
            # for nobody. What it did anyway is billed from its answer by the resolver.
            if submitted:
                await asyncio.shield(self._cancel_quietly(call.endpoint, submitted[0]))
            raise

    async def outcome(self, endpoint: str, request_id: str) -> UpstreamOutcome:
        """What became of a queue request fal already accepted (for the crash sweeper).

        ``PENDING`` while queued/running, ``COMPLETED`` with the result, ``FAILED`` when fal
        finished it without a billable result (error, cancelled), ``UNKNOWN`` when fal does not
        know the id. Raises the mapped error when fal cannot be asked right now.
        """
        base = self._request_url(endpoint, request_id)
        response = await self._send("GET", base + "/status", phase="status")
        if response.status_code == 404:
            return UpstreamOutcome(OutcomeState.UNKNOWN)
        if response.status_code not in (200, 202):
            raise error_for(response, "status")
        status = _body_of(response)
        if not isinstance(status, Mapping) or status.get("status") != "COMPLETED":
            return UpstreamOutcome(OutcomeState.PENDING)
        if status.get("error"):
            if status.get("error_type") == "request_cancelled":
                return UpstreamOutcome(OutcomeState.CANCELLED)
            return UpstreamOutcome(OutcomeState.FAILED)
        response = await self._send("GET", base, phase="result")
        if response.status_code == 404:
            return UpstreamOutcome(OutcomeState.UNKNOWN)
        if 400 <= response.status_code < 500 and response.status_code not in (401, 403, 429):
            body = _body_of(response)
            error_type = body.get("error_type") if isinstance(body, Mapping) else None
            if error_type == "request_cancelled":
                return UpstreamOutcome(OutcomeState.CANCELLED)
            return UpstreamOutcome(OutcomeState.FAILED)
        if response.status_code != 200:
            raise error_for(response, "result")
        try:
            result = parse_result(_body_of(response), request_id)
        except UpstreamError:
            return UpstreamOutcome(OutcomeState.FAILED)
        return UpstreamOutcome(OutcomeState.COMPLETED, result)

    async def cancel(self, endpoint: str, request_id: str) -> str:
        """Ask fal to cancel a queue request; returns fal's answer.

        ``OK`` (removed from the queue), ``CANCELLATION_REQUESTED`` (it was running),
        ``ALREADY_COMPLETED`` or ``NOT_FOUND``.
        """
        url = self._request_url(endpoint, request_id) + "/cancel"
        response = await self._send("PUT", url, phase="cancel")
        body = _body_of(response)
        answer = body.get("status") if isinstance(body, Mapping) else None
        if response.status_code < 300 or (response.status_code in (400, 404) and answer):
            return str(answer or "OK")
        raise error_for(response, "cancel")

    # --- the two protocols -------------------------------------------------
    async def _run_sync(self, call: UpstreamCall) -> UpstreamResult:
        url = _model_url(f"{self._run_url}/{call.endpoint.strip('/')}")
        response = await self._send("POST", url, json=call.arguments, phase="run")
        if response.status_code != 200:
            raise error_for(response, "run")
        request_id = response.headers.get("x-fal-request-id")
        # Debug only: the access line already carries fal's request id, and a second JSON line
        # per request cost a few per cent of the sync path's CPU (bench/).
        log.debug(
            "fal run finished", extra={"endpoint": call.endpoint, "fal_request_id": request_id}
        )
        return parse_result(_body_of(response), request_id)

    async def submit(self, call: UpstreamCall) -> str:
        """Put a job in fal's queue and return fal's request id (the job is not followed)."""
        url = _model_url(f"{self._queue_url}/{call.endpoint.strip('/')}")
        headers = {}
        if self._settings.upstream_queue_timeout_s > 1:
            # fal's own start deadline: queue wait beyond it ends as a 504 'user' timeout.
            headers["X-Fal-Request-Timeout"] = f"{self._settings.upstream_queue_timeout_s:g}"
        response = await self._send(
            "POST", url, json=call.arguments, headers=headers, phase="submit"
        )
        if not 200 <= response.status_code < 300:
            raise error_for(response, "submit")
        body = _body_of(response)
        request_id = body.get("request_id") if isinstance(body, Mapping) else None
        if not isinstance(request_id, str) or not request_id:
            raise UpstreamError("fal accepted the request without a request id.")
        # Debug, like "fal run finished": the access line carries fal's request id (issue 15).
        log.debug(
            "fal request submitted", extra={"endpoint": call.endpoint, "fal_request_id": request_id}
        )
        return request_id

    async def _run_queued(
        self, call: UpstreamCall, on_submitted: OnSubmitted | None, submitted: list[str]
    ) -> UpstreamResult:
        request_id = await self.submit(call)
        submitted.append(request_id)
        if on_submitted is not None:
            try:
                await on_submitted(request_id)
            except BaseException:
                # The caller cannot track this request, so it must not run (or bill).
                submitted.clear()
                await asyncio.shield(self._cancel_quietly(call.endpoint, request_id))
                raise

        base = self._request_url(call.endpoint, request_id)
        if not (self._settings.upstream_status_stream and await self._stream_until_done(base)):
            await self._poll_until_done(base)

        # A failed request is COMPLETED too; its result carries the model's error.
        response = await self._send("GET", base, phase="result")
        if response.status_code != 200:
            raise error_for(response, "result")
        return parse_result(_body_of(response), request_id)

    async def _stream_until_done(self, base: str) -> bool:
        """Follow fal's status stream until it ends; True if its last event was COMPLETED.

        One call for the whole wait instead of a status poll every interval (issue 15): the
        stream sends an event per status change and ends after COMPLETED (fal-protocol.md
        1.3), so its body is complete when fal is done. Anything else (no stream, an error
        answer, a stream that ended early) returns False and the caller polls the status,
        which reports errors as before.
        """
        response = await self._send(
            "GET", base + "/status/stream", phase="status", headers=_SSE_HEADERS
        )
        if response.status_code != 200:
            return False
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            return False
        # Server-sent events are UTF-8 by definition: decoded as such, not through httpx's
        # ``.text``, which looks for a charset in the content type on every call.
        last = _last_event(response.content.decode("utf-8", "replace"))
        return last is not None and last.get("status") == "COMPLETED"

    async def _poll_until_done(self, base: str) -> None:
        # Poll quickly at first, backing off to the configured interval: a fast job is not
        # kept waiting a whole interval, a slow one costs a handful of extra status calls.
        delay = min(_FIRST_POLL_S, self._settings.upstream_poll_interval_s)
        while True:
            response = await self._send("GET", base + "/status", phase="status")
            if response.status_code not in (200, 202):
                raise error_for(response, "status")
            status = _body_of(response)
            if isinstance(status, Mapping) and status.get("status") == "COMPLETED":
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._settings.upstream_poll_interval_s)

    # --- plumbing ----------------------------------------------------------
    def _request_url(self, endpoint: str, request_id: str) -> str:
        return f"{self._queue_url}/{app_path(endpoint)}/requests/{request_id}"

    async def _cancel_quietly(self, endpoint: str, request_id: str) -> None:
        """Best-effort cancel on the way out of a failed or abandoned call."""
        try:
            async with asyncio.timeout(_CANCEL_TIMEOUT_S):
                answer = await self.cancel(endpoint, request_id)
            log.info(
                "fal request cancelled",
                extra={"endpoint": endpoint, "fal_request_id": request_id, "answer": answer},
            )
        except (FalgateError, TimeoutError) as exc:
            log.warning(
                "could not cancel fal request: %s",
                type(exc).__name__,
                extra={"endpoint": endpoint, "fal_request_id": request_id},
            )

    def _backoff(self, attempt: int, response: httpx.Response | None) -> float:
        if response is not None and response.status_code == 429:
            retry_after = response.headers.get("retry-after", "")
            if retry_after.isdigit():
                return min(float(retry_after), _MAX_BACKOFF_S)
        base = self._settings.upstream_retry_backoff_s * (2**attempt)
        return float(min(base * random.uniform(0.5, 1.5), _MAX_BACKOFF_S))

    async def _send(
        self,
        method: str,
        url: str | httpx.URL,
        *,
        phase: Phase,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """One fal call with bounded retries; returns the final response, whatever its status."""
        if self._http is None:
            raise RuntimeError("FalClient.start() was not called")
        repeatable = method != "POST"
        retries = max(self._settings.upstream_max_retries, 0)
        # Encoded once, with orjson (httpx's ``json=`` is the standard library's encoder).
        content = None if json is None else fastjson.dumps(json)
        request_headers = dict(headers or {})
        if content is not None:
            request_headers["Content-Type"] = "application/json"
        for attempt in range(retries + 1):
            last = attempt == retries
            try:
                response = await self._http.request(
                    method, url, content=content, headers=request_headers
                )
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
                # Nothing reached fal: always safe to try again.
                if last:
                    raise UpstreamError("fal is unreachable.") from exc
                failure: httpx.Response | None = None
            except httpx.TimeoutException as exc:
                if last or not repeatable:
                    raise UpstreamTimeout(f"fal did not answer in time ({phase}).") from exc
                failure = None
            except httpx.TransportError as exc:
                if last or not repeatable:
                    raise UpstreamError(f"The connection to fal failed ({phase}).") from exc
                failure = None
            else:
                retry_on = _RETRY_STATUSES_REPEATABLE if repeatable else _RETRY_STATUSES
                if response.status_code not in retry_on or _is_user_timeout(response) or last:
                    return response
                failure = response
            delay = self._backoff(attempt, failure)
            log.info(
                "retrying fal call",
                extra={
                    "phase": phase,
                    "attempt": attempt + 1,
                    "status": failure.status_code if failure is not None else None,
                    "delay_s": round(delay, 3),
                },
            )
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")
