"""Routes whose parameters are worked out once, at start-up, instead of on every request.

For each request FastAPI's handler walks the route's whole dependency tree: it checks every
parameter's kind, aliases and sequence-ness, keys a cache per dependency, opens telemetry
spans, parses the Content-Type with :mod:`email`, and then validates. On the metered routes
that was ~0.1 ms of CPU per request for three things: the calling key, two strings and one
JSON body (issue 15). :class:`FlatRoute` does the same work from a plan made when the route
is built, in FastAPI's order and with FastAPI's errors:

1. the body is read; JSON (by the same media-type rule) is parsed, and bad JSON is FastAPI's
   ``json_invalid`` error;
2. the route's dependencies run, in order (each takes the request and nothing else);
3. path parameters (strings) and headers (optional strings) are taken from the request;
4. the body is validated against its model, errors located under ``("body", ...)`` as
   FastAPI locates them; any error is a ``RequestValidationError``.

Only that shape is planned; a route with anything else (query or cookie parameters, a
response model to serialise, dependencies of dependencies, ``yield`` dependencies...) keeps
FastAPI's handler, and so does every request while ``app.dependency_overrides`` is not
empty. The OpenAPI document comes from the same route declaration as before. What a planned
route does not do is fill FastAPI's own per-request telemetry record (body and values).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Annotated, Any, cast

import fastapi.routing
import orjson
from fastapi import HTTPException, params
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.requests import Request
from starlette.responses import Response

Handler = Callable[[Request], Coroutine[Any, Any, Response]]
_NO_BODY = object()


def is_json_media(content_type: str) -> bool:
    """``application/json`` or ``application/*+json``, parameters and case ignored."""
    maintype, _, subtype = content_type.split(";")[0].strip().lower().partition("/")
    return maintype == "application" and (subtype == "json" or subtype.endswith("+json"))


def _parsed_json(body: bytes) -> Any:
    """``json.loads``'s result (what FastAPI uses), taken from orjson when it can parse the
    body: orjson accepts a subset of what ``json.loads`` does and gives the same values for
    it; everything else (NaN, numbers past 64 bits, UTF-16...) and every error message is the
    standard library's."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return json.loads(body)


def _missing_body() -> dict[str, Any]:
    """FastAPI's error for a required body that was not sent."""
    error = ValidationError.from_exception_data(
        "Field required", [{"type": "missing", "loc": ("body",), "input": {}}]
    ).errors(include_url=False)[0]
    error["input"] = None
    return dict(error)


@dataclass(frozen=True)
class _Param:
    """One parameter: its name, where it is in the request, how FastAPI validates it (the same
    ``TypeAdapter`` of the annotation with its ``Path``/``Header``/``Body`` constraints) and
    where FastAPI locates its errors."""

    name: str
    key: str
    adapter: TypeAdapter[Any] | None  # None: a plain ``str``, nothing to check
    loc: tuple[str, ...]

    @classmethod
    def of(cls, field: Any, kind: str) -> _Param:
        info = field.field_info
        plain = info.annotation is str and not info.metadata
        # What FastAPI's ModelField validates with: the annotation, constrained by its field.
        adapter: TypeAdapter[Any] | None = (
            None if plain else TypeAdapter(cast(Any, Annotated[info.annotation, info]))
        )
        return cls(
            field.name, field.alias, adapter, (kind,) if kind == "body" else (kind, field.alias)
        )

    def validate(self, value: Any, values: dict[str, Any], errors: list[dict[str, Any]]) -> None:
        if self.adapter is None:
            values[self.name] = value
            return
        try:
            values[self.name] = self.adapter.validate_python(value, from_attributes=True)
        except ValidationError as exc:
            errors.extend(
                {**error, "loc": (*self.loc, *error.get("loc", ()))}
                for error in exc.errors(include_url=False)
            )


@dataclass(frozen=True)
class _Plan:
    """What one route's requests need, found once from FastAPI's dependency tree."""

    call: Callable[..., Coroutine[Any, Any, Response]]
    request_name: str | None
    # (parameter or None for one run only for its effect, the dependency, its request name)
    dependencies: tuple[tuple[str | None, Callable[..., Coroutine[Any, Any, Any]], str], ...]
    path_params: tuple[_Param, ...]
    headers: tuple[_Param, ...]  # each optional: absent is its default, ``None``
    body: _Param | None
    json_without_content_type: bool  # FastAPI's ``strict_content_type=False``

    async def handle(self, request: Request) -> Response:
        body = await self._read_body(request) if self.body is not None else _NO_BODY
        values: dict[str, Any] = {}
        if self.request_name is not None:
            values[self.request_name] = request
        solved: dict[int, Any] = {}  # as FastAPI's cache: a dependency listed twice runs once
        for name, dependency, request_name in self.dependencies:
            if id(dependency) not in solved:
                solved[id(dependency)] = await dependency(**{request_name: request})
            if name is not None:
                values[name] = solved[id(dependency)]
        errors: list[dict[str, Any]] = []
        path = request.path_params
        for param in self.path_params:
            param.validate(path[param.key], values, errors)
        headers = request.headers
        for param in self.headers:
            if (value := headers.get(param.key)) is not None:
                param.validate(value, values, errors)
            else:
                values[param.name] = None
        if self.body is not None:
            if body is _NO_BODY:
                errors.append(_missing_body())
            else:
                self.body.validate(body, values, errors)
        if errors:
            raise RequestValidationError(errors, body=None if body is _NO_BODY else body)
        response = await self.call(**values)
        if not isinstance(response, Response):
            raise TypeError(f"{self.call.__qualname__} must return a Response")
        return response

    async def _read_body(self, request: Request) -> Any:
        """The body as FastAPI gives it to validation: parsed JSON when the request says JSON,
        the bytes otherwise, nothing when empty."""
        try:
            data = await request.body()
            if not data:
                return _NO_BODY
            content_type = request.headers.get("content-type")
            if content_type:
                return _parsed_json(data) if is_json_media(content_type) else data
            return _parsed_json(data) if self.json_without_content_type else data
        except json.JSONDecodeError as exc:
            error = {
                "type": "json_invalid",
                "loc": ("body", exc.pos),
                "msg": "JSON decode error",
                "input": {},
                "ctx": {"error": exc.msg},
            }
            raise RequestValidationError([error], body=exc.doc) from exc
        except HTTPException:
            raise
        except Exception as exc:  # as FastAPI: a client gone mid-body, nesting too deep...
            raise HTTPException(
                status_code=400, detail="There was an error parsing the body"
            ) from exc


def _takes_framework_objects(dependant: Any) -> bool:
    """Whether it asks FastAPI for a websocket, connection, response, background tasks or
    security scopes (none of which a plan provides)."""
    return any(
        (
            dependant.websocket_param_name,
            dependant.http_connection_param_name,
            dependant.response_param_name,
            dependant.background_tasks_param_name,
            dependant.security_scopes_param_name,
        )
    )


def _request_only(dependant: Any) -> bool:
    """A dependency that takes the request and nothing else, and is awaited."""
    return (
        dependant.request_param_name is not None
        and not dependant.dependencies
        and not any(
            (
                dependant.path_params,
                dependant.query_params,
                dependant.header_params,
                dependant.cookie_params,
                dependant.body_params,
            )
        )
        and not _takes_framework_objects(dependant)
        and _awaitable(dependant.call)
        and getattr(dependant, "concurrency", None) is None
    )


def _awaitable(call: Any) -> bool:
    return inspect.iscoroutinefunction(call) or inspect.iscoroutinefunction(
        getattr(call, "__call__", None)  # noqa: B004 - a callable instance's method
    )


def _returns_response(call: Any) -> bool:
    try:
        returned = inspect.signature(call, eval_str=True).return_annotation
    except Exception:  # an annotation that does not resolve: FastAPI's handler then
        return False
    return isinstance(returned, type) and issubclass(returned, Response)


def _strict_content_type(route: Any) -> bool:
    """Whether a body without a Content-Type stays bytes (FastAPI's default since 0.12x; older
    versions, without the setting, parsed it as JSON)."""
    strict = getattr(route, "strict_content_type", None)
    if strict is None:
        return False
    return bool(getattr(strict, "value", strict))  # a DefaultPlaceholder holds the default


def _as_included(route: APIRoute) -> Any:
    """The route as FastAPI builds its handler: since FastAPI 0.16x a route included in an app
    gets a handler per inclusion, built from an "effective" copy carrying the inclusion's own
    dependencies, overrides provider and settings; before, the route itself carried them."""
    context_var = getattr(fastapi.routing, "_effective_route_context_var", None)
    context = context_var.get() if context_var is not None else None
    if context is not None and getattr(context, "original_route", None) is route:
        return context
    return route


def plan_of(route: APIRoute) -> _Plan | None:
    """The route's plan, or ``None`` when its shape is not the one planned here."""
    route = _as_included(route)
    dependant = route.dependant
    if not inspect.iscoroutinefunction(dependant.call) or not _returns_response(dependant.call):
        return None
    if dependant.query_params or dependant.cookie_params or len(dependant.body_params) > 1:
        return None
    if _takes_framework_objects(dependant):
        return None
    if not all(_request_only(sub) for sub in dependant.dependencies):
        return None
    path_params = []
    for field in dependant.path_params:
        if field.field_info.annotation is not str:
            return None
        path_params.append(_Param.of(field, "path"))
    headers = []
    for field in dependant.header_params:
        info = field.field_info
        # Optional strings under an explicit header name: nothing to convert.
        if info.annotation != (str | None) or info.default is not None or field.alias == field.name:
            return None
        headers.append(_Param.of(field, "header"))
    body = None
    if dependant.body_params:
        field = dependant.body_params[0]
        model = field.field_info.annotation
        embedded = getattr(route, "_embed_body_fields", False)
        if (
            embedded
            or getattr(field.field_info, "embed", False)
            or not isinstance(field.field_info, params.Body)
            or isinstance(field.field_info, params.Form)
            or not (isinstance(model, type) and issubclass(model, BaseModel))
            or not field.field_info.is_required()
        ):
            return None
        body = _Param.of(field, "body")
    return _Plan(
        call=dependant.call,
        request_name=dependant.request_param_name,
        # _request_only checked that each has an awaitable call and a request parameter.
        dependencies=tuple(
            (sub.name, cast(Any, sub.call), cast(str, sub.request_param_name))
            for sub in dependant.dependencies
        ),
        path_params=tuple(path_params),
        headers=tuple(headers),
        body=body,
        json_without_content_type=not _strict_content_type(route),
    )


class FlatRoute(APIRoute):
    """An ``APIRoute`` that handles requests from its :func:`plan_of` when it has one.

    ``planned`` says whether the handler built last (FastAPI builds one per inclusion of the
    route, the app's last) follows a plan.
    """

    planned = False

    def get_route_handler(self) -> Handler:
        fastapi_handler = super().get_route_handler()
        plan = plan_of(self)
        self.planned = plan is not None
        if plan is None:
            return fastapi_handler
        overrides = _as_included(self).dependency_overrides_provider

        async def flat(request: Request) -> Response:
            if overrides is not None and getattr(overrides, "dependency_overrides", None):
                return await fastapi_handler(request)
            return await plan.handle(request)

        return flat


__all__ = ["FlatRoute", "is_json_media", "plan_of"]
