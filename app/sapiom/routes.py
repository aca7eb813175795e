"""The Sapiom control-plane routes at falgate's root (SPEC section 12, ``sapiom-protocol.md``).

Point a Sapiom-wrapped client's control-plane ``baseURL`` at falgate's bare origin and use the
falgate key as its ``apiKey``; the SDK sends it as ``x-api-key``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Depends, Path, Request
from fastapi.security import APIKeyHeader

from app.deps import presented_key
from app.errors import Unauthorized, Unavailable
from app.keys.service import ApiKey, KeyService
from app.redis import REDIS_ERRORS
from app.sapiom.schemas import IdentityToken, TransactionComplete, TransactionCreate, TransactionOut
from app.sapiom.service import SapiomService
from app.schemas import error_responses

router = APIRouter(prefix="/v1", tags=["sapiom"])

# Declared for the OpenAPI document; read by ``presented_key`` (which also takes Bearer/Key).
_sdk_api_key = APIKeyHeader(
    name="x-api-key", auto_error=False, scheme_name="SapiomApiKey", description="The falgate key."
)


async def get_sapiom(request: Request) -> SapiomService:
    sapiom: SapiomService = request.app.state.sapiom
    return sapiom


async def control_plane_key(
    request: Request, _k: Annotated[str | None, Depends(_sdk_api_key)]
) -> ApiKey:
    """The key behind ``x-api-key`` as stored now, whatever its status (401 if no key)."""
    plaintext = presented_key(request)
    if not plaintext:
        raise Unauthorized("Missing API key: send 'x-api-key: <falgate key>'.")
    keys: KeyService = request.app.state.keys
    try:
        key = await keys.lookup(plaintext)
    except REDIS_ERRORS as exc:
        raise Unavailable("The gateway's state store is unavailable; try again shortly.") from exc
    request.state.key_id = key.id
    return key


async def usable_control_plane_key(key: Annotated[ApiKey, Depends(control_plane_key)]) -> ApiKey:
    key.check_usable()
    return key


SapiomDep = Annotated[SapiomService, Depends(get_sapiom)]
AnyStatusKey = Annotated[ApiKey, Depends(control_plane_key)]
UsableKey = Annotated[ApiKey, Depends(usable_control_plane_key)]
TransactionIdPath = Annotated[str, Path(max_length=200, description="A transaction id.")]


@router.post(
    "/transactions",
    operation_id="createSapiomTransaction",
    status_code=201,
    response_model=TransactionOut,
    responses=error_responses(400, 401, 503),
    summary="Authorize one request of a Sapiom-wrapped client",
)
async def create_transaction(
    body: Annotated[TransactionCreate, Body()], key: AnyStatusKey, sapiom: SapiomDep
) -> TransactionOut:
    """``authorized`` with an id the client sends as ``X-Sapiom-Transaction-Id`` (single use,
    valid 5 minutes, for this method and URL only); ``denied`` for a revoked or expired key or
    one with no budget left."""
    return await sapiom.create(key, body)


@router.get(
    "/transactions/{transaction_id}",
    operation_id="getSapiomTransaction",
    response_model=TransactionOut,
    responses=error_responses(401, 404, 503),
    summary="A transaction's status",
)
async def get_transaction(
    transaction_id: TransactionIdPath, key: UsableKey, sapiom: SapiomDep
) -> TransactionOut:
    return await sapiom.get(key, transaction_id)


@router.post(
    "/transactions/{transaction_id}/complete",
    operation_id="completeSapiomTransaction",
    response_model=TransactionOut,
    responses=error_responses(400, 401, 404, 503),
    summary="Record that the authorized request finished",
)
async def complete_transaction(
    transaction_id: TransactionIdPath,
    key: UsableKey,
    sapiom: SapiomDep,
    body: Annotated[TransactionComplete | None, Body()] = None,
) -> TransactionOut:
    return await sapiom.complete(key, transaction_id, body or TransactionComplete())


@router.post(
    "/auth/tokens",
    operation_id="createSapiomIdentityToken",
    response_model=IdentityToken,
    responses=error_responses(401, 503),
    summary="An identity token for Sapiom SDK 0.5.x (cached by the SDK, unused by falgate)",
)
async def create_identity_token(key: UsableKey, sapiom: SapiomDep) -> IdentityToken:
    return sapiom.identity_token(key)
