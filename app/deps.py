"""FastAPI dependencies: the pooled clients from the lifespan, and authentication."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from app.catalog import Catalog
from app.errors import Unauthorized, Unavailable
from app.keys.service import ApiKey, KeyService
from app.redis import REDIS_ERRORS
from app.sapiom.service import SapiomService
from app.settings import Settings

_admin_bearer = HTTPBearer(auto_error=False, scheme_name="AdminToken")
SAPIOM_TRANSACTION_HEADER = "x-sapiom-transaction-id"
# The ways a request presents a gateway key, as OpenAPI security schemes (any one of them):
# generated clients learn them from the document. The headers are parsed by hand below,
# because ``Authorization: Key <key>`` is not a scheme FastAPI knows.
KEY_SCHEMES = (
    HTTPBearer(auto_error=False, description="`Authorization: Bearer <key>` or `Key <key>`"),
    APIKeyHeader(name="X-API-Key", auto_error=False),
    APIKeyHeader(
        name="X-Sapiom-Transaction-Id",
        auto_error=False,
        scheme_name="SapiomTransaction",
        description="A transaction from `POST /v1/transactions`: single use, for that request "
        "only.",
    ),
)


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


class GatewayKey(HTTPBearer):
    """The calling key as ONE FastAPI dependency (:func:`current_key`).

    Each security scheme declared as a dependency of its own costs FastAPI a dependency solve
    per request, only for the document's sake (issue 15). This one is declared as the first of
    :data:`KEY_SCHEMES`; ``app.openapi.contract_document`` lists all of them on every operation
    that carries it.
    """

    async def __call__(self, request: Request) -> ApiKey:  # type: ignore[override]
        return await current_key(request)


gateway_key = GatewayKey(
    auto_error=False,
    scheme_name=KEY_SCHEMES[0].scheme_name,
    description=KEY_SCHEMES[0].model.description,
)


async def require_admin(
    request: Request,
    _b: Annotated[HTTPAuthorizationCredentials | None, Depends(_admin_bearer)],
) -> None:
    expected: str = request.app.state.admin_token
    header = request.headers.get("authorization", "")
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not value:
        raise Unauthorized("Missing admin token: send 'Authorization: Bearer <admin token>'.")
    if not hmac.compare_digest(value.strip().encode(), expected.encode()):
        raise Unauthorized("Invalid admin token.")


CurrentKey = Annotated[ApiKey, Depends(gateway_key)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
CatalogDep = Annotated[Catalog, Depends(get_catalog)]
KeysDep = Annotated[KeyService, Depends(get_keys)]
AdminDep = Depends(require_admin)
