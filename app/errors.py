"""The gateway's one error hierarchy and the handlers that render SPEC section 7's envelope.

FalgateError                      (500, internal_error - never raised on purpose)
├── InvalidRequest                400 invalid_request
│   └── UnsupportedFeature        400 unsupported (fal webhooks, fal storage uploads)
├── Unauthorized                  401 unauthorized
├── BudgetExceeded                402 budget_exceeded
├── Forbidden                     403 forbidden
├── NotFound                      404 not_found
│   └── ModelNotFound             404 model_not_found
├── RequestTimeout                408 request_timeout
├── IdempotencyConflict           409 idempotency_conflict
├── PayloadTooLarge               413 payload_too_large
├── RateLimited                   429 rate_limited
├── UpstreamError                 502 upstream_error
├── Unavailable                   503 unavailable
└── UpstreamTimeout               504 upstream_timeout
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from typing import Any

import redis.exceptions
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from app.fastjson import FastJSONResponse

log = logging.getLogger("falgate.errors")


class FalgateError(Exception):
    """Base of every error the gateway answers with; carries everything the envelope needs."""

    status_code = 500
    type = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})


class InvalidRequest(FalgateError):
    status_code = 400
    type = "invalid_request"


class UnsupportedFeature(InvalidRequest):
    """A fal feature the gateway does not serve (webhooks, storage uploads): refused plainly,
    never silently dropped."""

    type = "unsupported"


class Unauthorized(FalgateError):
    status_code = 401
    type = "unauthorized"


class BudgetExceeded(FalgateError):
    status_code = 402
    type = "budget_exceeded"


class Forbidden(FalgateError):
    status_code = 403
    type = "forbidden"


class NotFound(FalgateError):
    status_code = 404
    type = "not_found"


class ModelNotFound(NotFound):
    type = "model_not_found"


class RequestTimeout(FalgateError):
    """The body stopped arriving (raised as such by ``app.http.BodyLimitMiddleware``)."""

    status_code = 408
    type = "request_timeout"


class IdempotencyConflict(FalgateError):
    status_code = 409
    type = "idempotency_conflict"


class PayloadTooLarge(FalgateError):
    status_code = 413
    type = "payload_too_large"


class RateLimited(FalgateError):
    status_code = 429
    type = "rate_limited"


class UpstreamError(FalgateError):
    status_code = 502
    type = "upstream_error"


class ClientClosedRequest(FalgateError):
    """The caller went away before the answer (nginx's 499): nobody reads this response; it
    exists so the access log and metrics record the request plainly, not as a crash."""

    status_code = 499
    type = "client_closed_request"


class Unavailable(FalgateError):
    status_code = 503
    type = "unavailable"


class UpstreamTimeout(FalgateError):
    status_code = 504
    type = "upstream_timeout"


def _error_types() -> tuple[str, ...]:
    """Every ``type`` the envelope can carry, from the hierarchy above."""
    seen: list[str] = []
    pending: list[type[FalgateError]] = [FalgateError]
    while pending:
        cls = pending.pop(0)
        if cls.type not in seen:
            seen.append(cls.type)
        pending.extend(cls.__subclasses__())
    return tuple(seen)


ERROR_TYPES = _error_types()


def request_id_of(request: Request) -> str:
    """The id the request-id middleware gave this request (or a fresh one)."""
    rid = getattr(request.state, "request_id", None)
    if rid is None:
        rid = f"req_{uuid.uuid4().hex}"
        request.state.request_id = rid
    return str(rid)


def error_body(
    type_: str,
    message: str,
    *,
    param: str | None,
    request_id: str,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    error: dict[str, Any] = {
        "type": type_,
        "message": message,
        "param": param,
        "request_id": request_id,
    }
    error.update(extra or {})
    return {"error": error}


def error_response(request: Request, exc: FalgateError) -> JSONResponse:
    rid = request_id_of(request)
    headers = {"X-Request-Id": rid, **exc.headers}
    body = error_body(exc.type, exc.message, param=exc.param, request_id=rid, extra=exc.extra)
    return FastJSONResponse(body, status_code=exc.status_code, headers=headers)


def _field_of(loc: tuple[Any, ...] | list[Any]) -> str | None:
    """``("body", "image_size", "ImageSizeObject", "width")`` -> ``"image_size.width"``.

    pydantic names the union member it tried in the location (a class name or a tag such as
    ``literal['a','b']``); those are not fields.
    """
    if loc and loc[0] in ("query", "path", "header", "cookie") and len(loc) > 1:
        return str(loc[1])  # a parameter's own name, as sent ("Idempotency-Key")
    parts = [str(p) for p in loc[1:]] if loc and loc[0] == "body" else []
    if not parts and loc and loc[0] not in ("body", "query", "path", "header", "cookie"):
        parts = [str(p) for p in loc]
    fields = [p for p in parts if not (p[:1].isupper() or "[" in p or p.startswith("function-"))]
    return ".".join(fields) or None


def _most_specific(errors: list[Any]) -> Any:
    """Of the errors about the first offending field, the one deepest inside it.

    For ``{"image_size": {"width": 10, ...}}`` pydantic reports both "not a preset" and
    "width too small"; the second is the one a user can act on.
    """
    first = errors[0]
    top = _field_of(first.get("loc", ()))
    head = (top or "").split(".")[0]
    same = [e for e in errors if (_field_of(e.get("loc", ())) or "").split(".")[0] == head]
    return max(same, key=lambda e: len(_field_of(e.get("loc", ())) or ""))


def validation_error(exc: RequestValidationError) -> InvalidRequest:
    """Turn FastAPI's 422 into our 400, naming the first offending field."""
    errors = list(exc.errors())
    if not errors:
        return InvalidRequest("Invalid request body.")
    first = _most_specific(errors)
    field = _field_of(first.get("loc", ()))
    kind = first.get("type", "")
    if kind == "json_invalid":
        return InvalidRequest("Request body is not valid JSON.")
    if kind == "missing" and field is None:
        return InvalidRequest("A JSON request body is required.")
    if kind == "extra_forbidden":
        return InvalidRequest(f"Unknown field '{field}'.", param=field)
    msg = str(first.get("msg", "is invalid"))
    if field is None:
        return InvalidRequest(f"Invalid request body: {msg}.")
    return InvalidRequest(f"Invalid value for '{field}': {msg}.", param=field)


def _leaf_routes(routes: list[Any]) -> list[Any]:
    """The app's routes, with those of included routers in place of the routers."""
    leaves: list[Any] = []
    for route in routes:
        included = getattr(route, "original_router", None)  # FastAPI's included-router node
        leaves += _leaf_routes(included.routes) if included is not None else [route]
    return leaves


def _allowed_methods(request: Request) -> str:
    """Every method some route of this path takes (the router names only the first route's)."""
    methods: set[str] = set()
    for route in _leaf_routes(request.app.router.routes):
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return ", ".join(sorted(methods))


def content_type_error(request: Request, exc: RequestValidationError) -> InvalidRequest | None:
    """A body refused because it was not sent as JSON: say which header to send."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media == "application/json" or media.endswith("+json"):
        return None
    if not any(tuple(e.get("loc", ()))[:1] == ("body",) for e in exc.errors()):
        return None
    got = f"'{media[:100]}'" if media else "none"
    return InvalidRequest(
        f"The request body must be JSON sent with 'Content-Type: application/json' "
        f"(Content-Type received: {got})."
    )


def add_exception_handlers(app: FastAPI) -> None:
    """Every error leaves the gateway in the same envelope; nothing leaks a stack trace."""

    @app.exception_handler(FalgateError)
    async def _falgate(request: Request, exc: FalgateError) -> JSONResponse:
        return error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        not_json = content_type_error(request, exc)
        return error_response(request, not_json or validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        mapped: FalgateError
        if exc.status_code == 404:
            mapped = NotFound("No such route.")
        elif exc.status_code == 405:
            allow = _allowed_methods(request) or (exc.headers or {}).get("Allow", "")
            mapped = InvalidRequest(
                f"Method {request.method} is not allowed on this route; it takes {allow}.",
                headers={"Allow": allow},
            )
            mapped.status_code = 405
        else:
            mapped = FalgateError(str(exc.detail))
            mapped.status_code = exc.status_code
            mapped.type = "invalid_request" if exc.status_code < 500 else "internal_error"
        return error_response(request, mapped)

    @app.exception_handler(redis.exceptions.ConnectionError)
    @app.exception_handler(redis.exceptions.TimeoutError)
    async def _store_down(request: Request, exc: Exception) -> JSONResponse:
        # Any route that reaches Redis outside the metering layer (admin, keys, reports).
        log.warning("Redis unavailable: %s", type(exc).__name__)
        unavailable = Unavailable(
            "The gateway's state store is unavailable; try again shortly.",
            headers={"Retry-After": "1"},
        )
        return error_response(request, unavailable)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error", extra={"request_id": request_id_of(request)})
        return error_response(request, FalgateError("Internal error."))
