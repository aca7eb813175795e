"""FastAPI dependencies: the pooled clients from the lifespan, and authentication."""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import Depends, Request

from app.catalog import Catalog
from app.errors import Unauthorized, Unavailable
from app.keys.service import ApiKey, KeyService
from app.redis import REDIS_ERRORS
from app.sapiom.service import SapiomService
from app.settings import Settings

# The credentials are parsed by hand below (``Authorization: Key <key>`` is not a scheme
# FastAPI knows), and their schemes are written into the OpenAPI document by
# :func:`document_security` rather than declared as FastAPI security dependencies: those are
# solved (and the headers parsed again) on every request just to be documented (issue 15).
SAPIOM_TRANSACTION_HEADER = "x-sapiom-transaction-id"
SECURITY_SCHEMES: dict[str, dict[str, str]] = {
    "HTTPBearer": {
        "type": "http",
        "description": "`Authorization: Bearer <key>` or `Key <key>`",
        "scheme": "bearer",
    },
    "APIKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
    "SapiomTransaction": {
        "type": "apiKey",
        "description": "A transaction from `POST /v1/transactions`: single use, for that request "
        "only.",
        "in": "header",
        "name": "X-Sapiom-Transaction-Id",
    },
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


def _sapiom_request_url(request: Request, sapiom: SapiomService) -> str | None:
    """The URL this request was sent to, as a Sapiom transaction names it."""
    scope = request.scope
    raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
    return sapiom.request_url(
        scheme=scope.get("scheme", "http"),
        host=request.headers.get("host"),
        raw_path=raw_path.decode("latin-1"),
        query=scope.get("query_string", b"").decode("latin-1"),
    )


async def current_key(request: Request) -> ApiKey:
    """The calling key: from the key the request presents, or from a Sapiom transaction.

    A request with credentials (``Authorization``/``X-API-Key``) is that key's, exactly as
    without Sapiom; if it also carries ``X-Sapiom-Transaction-Id``, the transaction must be
    the same key's and is consumed. A request with only the transaction id is the creating
    key's (``app.sapiom.service.SapiomService.redeem``).
    """
    plaintext = presented_key(request)
    transaction_id = request.headers.get(SAPIOM_TRANSACTION_HEADER)
    # Credentials that are present are checked as always, even next to a transaction id.
    has_credentials = "authorization" in request.headers or "x-api-key" in request.headers
    keys: KeyService = request.app.state.keys
    settings: Settings = request.app.state.settings
    key: ApiKey | None = None
    try:
        if plaintext:
            key = await keys.authenticate(plaintext, cache_ttl_s=settings.auth_cache_ttl_s)
        if transaction_id is not None and (key is not None or not has_credentials):
            sapiom: SapiomService = request.app.state.sapiom
            key = await sapiom.redeem(
                transaction_id,
                method=request.method,
                url=_sapiom_request_url(request, sapiom),
                presented=key,
            )
    except REDIS_ERRORS as exc:
        raise Unavailable("The gateway's state store is unavailable; try again shortly.") from exc
    if key is None:
        raise Unauthorized(
            "Missing API key: send 'Authorization: Bearer <key>', "
            "'Authorization: Key <key>' or 'X-API-Key: <key>'."
        )
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


#: Which credentials each part of the API takes, for operations that declare none themselves:
#: every other ``/v1`` route depends on :func:`current_key`, every ``/admin`` route on
#: :func:`require_admin` (tests/api/test_catalog_and_prices.py checks that each refuses without).
_SECURITY_BY_PREFIX: tuple[tuple[str, list[dict[str, list[str]]]], ...] = (
    ("/v1/", [{"HTTPBearer": []}, {"APIKeyHeader": []}, {"SapiomTransaction": []}]),
    ("/admin/", [{"AdminToken": []}]),
)


def document_security(schema: dict[str, Any]) -> None:
    """Add the security schemes, and each operation's requirement, to an OpenAPI document."""
    for path, item in schema.get("paths", {}).items():
        requirement = next((r for p, r in _SECURITY_BY_PREFIX if path.startswith(p)), None)
        if requirement is None:
            continue
        for operation in item.values():
            if isinstance(operation, dict) and "security" not in operation:
                operation["security"] = requirement
    schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
    schemes.update(SECURITY_SCHEMES)
