"""Admin routes for gateway keys (SPEC section 8)."""

from __future__ import annotations

from fastapi import APIRouter

from app.deps import AdminDep, KeysDep
from app.errors import FalgateError
from app.keys.schemas import KeyCreate, KeyCreated, KeyList, KeyOut, KeyUpdate
from app.schemas import ErrorEnvelope, error_responses

router = APIRouter(
    prefix="/admin",
    tags=["admin"],
    dependencies=[AdminDep],
    responses=error_responses(401),
)


@router.post(
    "/keys",
    status_code=201,
    operation_id="createKey",
    response_model=KeyCreated,
    responses=error_responses(400),
)
async def create_key(body: KeyCreate, keys: KeysDep) -> KeyCreated:
    key, plaintext = await keys.create(body)
    return KeyCreated(**key.to_out().model_dump(), key=plaintext)


@router.get("/keys", operation_id="listKeys", response_model=KeyList)
async def list_keys(keys: KeysDep) -> KeyList:
    return KeyList(keys=[k.to_out() for k in await keys.list()])


@router.get(
    "/keys/{key_id}", operation_id="getKey", response_model=KeyOut, responses=error_responses(404)
)
async def get_key(key_id: str, keys: KeysDep) -> KeyOut:
    return (await keys.get(key_id)).to_out()


@router.patch(
    "/keys/{key_id}",
    operation_id="updateKey",
    response_model=KeyOut,
    responses=error_responses(400, 404),
)
async def update_key(key_id: str, body: KeyUpdate, keys: KeysDep) -> KeyOut:
    return (await keys.update(key_id, body)).to_out()


@router.delete(
    "/keys/{key_id}",
    operation_id="revokeKey",
    response_model=KeyOut,
    responses=error_responses(404),
)
async def revoke_key(key_id: str, keys: KeysDep) -> KeyOut:
    """Revoke a key. Its record and ledger stay; the key stops working at once."""
    return (await keys.revoke(key_id)).to_out()


__all__ = ["ErrorEnvelope", "FalgateError", "router"]
