"""The OpenAPI document as the contract: FastAPI's, corrected to what the server really does.

Routes declare what is particular to them (their body, their business errors, their headers);
what every route of a kind can answer is added here once, so no route can forget it:

- every operation takes an optional ``X-Request-Id`` header (the client's own correlation id,
  checked by the request-context middleware before routing: 400 when malformed) and every
  response carries the gateway's ``X-Request-Id`` and echoes the client's as
  ``X-Client-Request-Id``;
- every operation can answer 400 (that header); every ``/v1`` and ``/admin`` operation also 401
  (no or a wrong key/token) and 503 (the state store is unreachable while authenticating);
- every operation whose method may carry a body can answer 408 (the body stopped arriving) and
  413 (too large): ``app.http.BodyLimitMiddleware`` reads it before routing;
- a parameter is never ``null`` (FastAPI writes ``str | None`` as ``anyOf [string, null]``);
- FastAPI's 422 is never sent (validation errors are our 400s), so it is removed, except on
  fal's own API (``/fal/``), which answers validation errors with fal's 422.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from app.deps import KEY_SCHEMES
from app.ops.logging import CLIENT_REQUEST_ID_HEADER
from app.schemas import REQUEST_ID, error_responses, header

_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
_GUARDED = ("/v1/", "/admin/")
_TEXT = {"schema": {"type": "string"}}
# The middleware's rule (1..128 printable ASCII); HTTP strips spaces at either end.
_CLIENT_ID_SCHEMA = {
    "type": "string",
    "minLength": 1,
    "maxLength": 128,
    "pattern": "^[\\x21-\\x7E](?:[\\x20-\\x7E]*[\\x21-\\x7E])?$",
}
_CLIENT_ID_PARAMETER = {
    "name": "X-Request-Id",
    "in": "header",
    "required": False,
    "description": "Your own id for this request: logged and echoed as X-Client-Request-Id, "
    "never used as an id of the gateway's state.",
    "schema": _CLIENT_ID_SCHEMA,
}
_ECHO = {
    CLIENT_REQUEST_ID_HEADER: header(
        "The X-Request-Id the client sent, when it sent one.", _CLIENT_ID_SCHEMA
    )
}


def _error_entry(code: int) -> dict[str, Any]:
    """One ``error_responses`` entry as it appears in the document (a ``$ref`` to the envelope)."""
    entry = dict(error_responses(code)[code])
    entry.pop("model")
    content = entry["content"]["application/json"]
    entry["content"] = {
        "application/json": {
            **content,
            "schema": {"$ref": "#/components/schemas/ErrorEnvelope"},
        }
    }
    return entry


def _not_null(schema: dict[str, Any]) -> dict[str, Any]:
    """``anyOf: [X, null]`` -> ``X`` (keeping the description): a header or query parameter is
    absent or a string, it is never JSON ``null``."""
    branches = schema.get("anyOf")
    if not isinstance(branches, list):
        return schema
    kept = [b for b in branches if b != {"type": "null"}]
    if len(kept) != 1 or len(kept) == len(branches):
        return schema
    rest = {k: v for k, v in schema.items() if k != "anyOf"}
    return {**kept[0], **rest}


_ENVELOPE_REF = {"$ref": "#/components/schemas/ErrorEnvelope"}


def _also_envelope(entry: dict[str, Any]) -> None:
    """A status the middlewares answer (400 for X-Request-Id, 408, 413) in the envelope, also
    where the route's own errors have another shape (fal's ``{"detail": ...}`` on ``/fal/``)."""
    media = entry.setdefault("content", {}).setdefault("application/json", {})
    schema = media.get("schema")
    if schema is None:
        media["schema"] = _ENVELOPE_REF
    elif schema != _ENVELOPE_REF and _ENVELOPE_REF not in schema.get("anyOf", []):
        media["schema"] = {"anyOf": [schema, _ENVELOPE_REF]}


def _complete(path: str, method: str, operation: dict[str, Any]) -> None:
    responses: dict[str, Any] = operation.setdefault("responses", {})
    if not path.startswith("/fal/"):  # fal's own API answers validation errors with 422, as fal
        responses.pop("422", None)
    parameters: list[dict[str, Any]] = operation.setdefault("parameters", [])
    for parameter in parameters:
        parameter["schema"] = _not_null(parameter.get("schema", {}))
    if not any(p.get("name") == "X-Request-Id" and p.get("in") == "header" for p in parameters):
        parameters.append(_CLIENT_ID_PARAMETER)
    codes = [400]
    if path.startswith(_GUARDED):
        codes += [401, 503]
    if method not in ("get", "head", "options"):
        codes += [408, 413]  # the body middleware reads every other method's body first
    for code in codes:
        entry = responses.setdefault(str(code), _error_entry(code))
        _also_envelope(entry)
    for response in responses.values():
        headers = response.setdefault("headers", {})
        for name, spec in {**REQUEST_ID, **_ECHO}.items():
            headers.setdefault(name, spec)
    operation["responses"] = dict(sorted(responses.items()))


def _key_schemes(schema: dict[str, Any]) -> None:
    """Every operation that takes a gateway key accepts any of ``KEY_SCHEMES`` (the one
    ``gateway_key`` dependency is declared as the first of them)."""
    first = KEY_SCHEMES[0].scheme_name
    alternatives: list[dict[str, list[str]]] = [{s.scheme_name: []} for s in KEY_SCHEMES]
    for item in schema.get("paths", {}).values():
        for method, operation in item.items():
            if method in _METHODS and operation.get("security") == [{first: []}]:
                operation["security"] = alternatives
    components = schema.setdefault("components", {}).setdefault("securitySchemes", {})
    for scheme in KEY_SCHEMES:
        components[scheme.scheme_name] = scheme.model.model_dump(
            mode="json", by_alias=True, exclude_none=True
        )


def contract_document(app: FastAPI) -> dict[str, Any]:
    """The app's OpenAPI document, built once."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
        tags=app.openapi_tags,
    )
    for path, item in schema.get("paths", {}).items():
        for method, operation in item.items():
            if method in _METHODS and isinstance(operation, dict):
                _complete(path, method, operation)
    _key_schemes(schema)
    metrics = schema.get("paths", {}).get("/metrics", {}).get("get")
    if metrics is not None:
        metrics["responses"]["200"]["content"] = {"text/plain": _TEXT}
    schemas = schema.get("components", {}).get("schemas", {})
    if '"#/components/schemas/HTTPValidationError"' not in json.dumps(schema.get("paths", {})):
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
    app.openapi_schema = schema
    return schema
