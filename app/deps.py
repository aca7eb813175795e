"""FastAPI dependencies: the pooled clients from the lifespan, and authentication."""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import Depends, Request

from app.catalog import Catalog
from app.errors import Unauthorized, Unavailable
from app.keys.service import ApiKey, KeyService
from app.redis import REDIS_ERRORS
from app.settings import Settings

# The credentials are parsed by hand below (``Authorization: Key <key>`` is not a scheme
# FastAPI knows), and the schemes are written into the OpenAPI document by
# :func:`document_security` rather than declared as FastAPI security dependencies: those are
# solved (and the header parsed again) on every request just to be documented (issue 15).
SECURITY_SCHEMES: dict[str, dict[str, str]] = {
    "HTTPBearer": {
        "type": "http",
        "description": "`Authorization: Bearer <key>` or `Key <key>`",
        "scheme": "bearer",
    },
    "APIKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
    "AdminToken": {"type": "http", "scheme": "bearer"},
}


# The accessors below are ``async def`` on purpose: FastAPI runs a plain ``def`` dependency in
# a worker thread, and that hop cost ~150 µs of CPU per dependency on every request.


async def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_catalog(request: Request) -> Catalog:
    catalog: Catalog = request.app.state.catalog
    return catalog


async def get_keys(request: Request) -> KeyService:
    keys: KeyService = request.app.state.keys
    return keys


def presented_key(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header:
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() in ("bearer", "key") and value.strip():
            return value.strip()
        return None
    api_key = request.headers.get("x-api-key")
    return api_key.strip() if api_key else None


async def current_key(request: Request) -> ApiKey:
    plaintext = presented_key(request)
    if not plaintext:
        raise Unauthorized(
            "Missing API key: send 'Authorization: Bearer <key>', "
            "'Authorization: Key <key>' or 'X-API-Key: <key>'."
        )
    keys: KeyService = request.app.state.keys
    settings: Settings = request.app.state.settings
    try:
        key = await keys.authenticate(plaintext, cache_ttl_s=settings.auth_cache_ttl_s)
    except REDIS_ERRORS as exc:
        raise Unavailable("The gateway's state store is unavailable; try again shortly.") from exc
    request.state.key_id = key.id
    return key


async def require_admin(request: Request) -> None:
    expected: str = request.app.state.admin_token
    header = request.headers.get("authorization", "")
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not value:
        raise Unauthorized("Missing admin token: send 'Authorization: Bearer <admin token>'.")
    if not hmac.compare_digest(value.strip().encode(), expected.encode()):
        raise Unauthorized("Invalid admin token.")


CurrentKey = Annotated[ApiKey, Depends(current_key)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
CatalogDep = Annotated[Catalog, Depends(get_catalog)]
KeysDep = Annotated[KeyService, Depends(get_keys)]
AdminDep = Depends(require_admin)


#: Which credentials each part of the API takes: every ``/v1`` route depends on
#: :func:`current_key`, every ``/admin`` route on :func:`require_admin` (tests/api check both).
_SECURITY_BY_PREFIX: tuple[tuple[str, list[dict[str, list[str]]]], ...] = (
    ("/v1/", [{"HTTPBearer": []}, {"APIKeyHeader": []}]),
    ("/admin/", [{"AdminToken": []}]),
)


def document_security(schema: dict[str, Any]) -> None:
    """Add the security schemes, and each operation's requirement, to an OpenAPI document."""
    for path, item in schema.get("paths", {}).items():
        requirement = next((r for p, r in _SECURITY_BY_PREFIX if path.startswith(p)), None)
        if requirement is None:
            continue
        for operation in item.values():
            if isinstance(operation, dict):
                operation["security"] = requirement
    schema.setdefault("components", {})["securitySchemes"] = dict(SECURITY_SCHEMES)
