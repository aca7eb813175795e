"""Gateway keys: creation, lookup by hash, updates, revocation.

Storage (all of one key under the hash tag ``{k:<id>}``, so it lives on one Cluster slot):

- ``{k:<id>}:meta``: hash with ``id, name, prefix, status, created_at, expires_at,
  revoked_at, budget_micro, budget_period, rpm, max_concurrent, models`` (empty = unset);
- ``falgate:keyhash:<sha256>`` -> id, the only way from a presented key to its record;
- ``falgate:keys``: set of every id.

Only the SHA-256 of a key is stored. Keys carry 256 random bits, so a fast hash is the
right tool (a slow password hash protects low-entropy secrets, which these are not).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from app.catalog.catalog import Catalog
from app.errors import Forbidden, InvalidRequest, NotFound, Unauthorized
from app.keys.schemas import DEFAULT_BUDGET_PERIOD, KeyCreate, KeyOut, KeyUpdate
from app.money import format_usd, parse_usd

KEY_PREFIX = "fgk_"
IDS_SET = "falgate:keys"
#: Pub/sub channel: a key id is published on it whenever that key changes.
KEY_CHANGES = "falgate:keys:changed"


def meta_key(key_id: str) -> str:
    return f"{{k:{key_id}}}:meta"


def hash_index_key(digest: str) -> str:
    return f"falgate:keyhash:{digest}"


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class ApiKey:
    """A key record as the request path needs it."""

    id: str
    name: str
    prefix: str
    status: str
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    budget_micro: int | None
    budget_period: str
    rpm: int | None
    max_concurrent: int | None
    models: tuple[str, ...] | None

    @classmethod
    def from_hash(cls, raw: dict[str, str]) -> ApiKey:
        def opt_int(name: str) -> int | None:
            value = raw.get(name, "")
            return int(value) if value else None

        def opt_float(name: str) -> float | None:
            value = raw.get(name, "")
            return float(value) if value else None

        models = raw.get("models", "")
        return cls(
            id=raw["id"],
            name=raw.get("name", ""),
            prefix=raw.get("prefix", ""),
            status=raw.get("status", "active"),
            created_at=float(raw.get("created_at") or 0),
            expires_at=opt_float("expires_at"),
            revoked_at=opt_float("revoked_at"),
            budget_micro=opt_int("budget_micro"),
            # A record without a period is enforced as monthly (SPEC's default; clock.lua's
            # period_field and Meter.usage read it so): shown as what it is enforced as.
            budget_period=raw.get("budget_period") or DEFAULT_BUDGET_PERIOD,
            rpm=opt_int("rpm"),
            max_concurrent=opt_int("max_concurrent"),
            models=tuple(json.loads(models)) if models else None,
        )

    def effective_status(self, now: float | None = None) -> str:
        if self.status == "revoked":
            return "revoked"
        if self.expires_at is not None and self.expires_at <= (now or time.time()):
            return "expired"
        return "active"

    def check_usable(self) -> None:
        status = self.effective_status()
        if status != "active":
            raise Unauthorized(f"This API key is {status}.")

    def check_model(self, model_id: str) -> None:
        if self.models is not None and model_id not in self.models:
            raise Forbidden(f"This API key may not use model '{model_id}'.", param="model")

    def to_out(self) -> KeyOut:
        def dt(ts: float | None) -> datetime | None:
            return None if ts is None else datetime.fromtimestamp(ts, UTC)

        return KeyOut(
            id=self.id,
            name=self.name,
            prefix=self.prefix,
            status=self.effective_status(),
            created_at=datetime.fromtimestamp(self.created_at, UTC),
            expires_at=dt(self.expires_at),
            revoked_at=dt(self.revoked_at),
            budget_usd=None if self.budget_micro is None else format_usd(self.budget_micro),
            budget_period=self.budget_period,
            rpm=self.rpm,
            max_concurrent=self.max_concurrent,
            models=None if self.models is None else list(self.models),
        )


def _ts(value: datetime | None) -> str:
    if value is None:
        return ""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return repr(value.timestamp())


def _fields(body: KeyCreate | KeyUpdate, present: set[str]) -> dict[str, str]:
    """The meta-hash fields for the body fields that were sent."""
    out: dict[str, str] = {}
    for name in present:
        value: Any = getattr(body, name)
        if name == "budget_usd":
            out["budget_micro"] = "" if value is None else str(parse_usd(value))
        elif name == "expires_at":
            out["expires_at"] = _ts(value)
        elif name == "models":
            out["models"] = "" if value is None else json.dumps(sorted(set(value)))
        elif name in ("rpm", "max_concurrent"):
            out[name] = "" if value is None else str(value)
        elif value is not None:
            out[name] = str(value)
    return out


def model_names(catalog: Catalog) -> dict[str, str]:
    """Every name a request may use for a model (catalog id, alias, upscaler id) -> its id."""
    names = {u: u for u in catalog.upscalers}
    for model in catalog.models.values():
        names[model.id] = model.id
        if model.alias:
            names[model.alias] = model.id
    return names


class KeyService:
    """Reads and writes key records; the admin routes and the CLI both go through it.

    ``known_models`` maps every accepted model name (ids and aliases) to its catalog id: a
    key's ``models`` list is stored as catalog ids, which is what requests are checked against.
    """

    def __init__(self, redis: Any, *, known_models: Mapping[str, str] | None = None) -> None:
        self.redis = redis
        self.known_models = known_models
        self._cache: dict[str, tuple[float, ApiKey]] = {}
        # The cache is used only while a listener hears every key change (see
        # ``app.keys.invalidation``); ``_generation`` moves on with every change heard, so a
        # read that raced a change is not cached.
        self._cache_enabled = False
        self._generation = 0

    def enable_cache(self, enabled: bool) -> None:
        """Called by the change listener: True once subscribed, False when it lost Redis."""
        self._cache_enabled = enabled
        self.forget()

    def forget(self, key_id: str | None = None) -> None:
        """Drop cached keys (all, or one key's), because a change was heard."""
        self._generation += 1
        if key_id is None:
            self._cache.clear()
            return
        for digest in [d for d, (_, k) in self._cache.items() if k.id == key_id]:
            del self._cache[digest]

    async def _changed(self, key_id: str) -> None:
        """Tell every gateway process (and this one) that a key changed: applies at once."""
        self.forget(key_id)
        await self.redis.publish(KEY_CHANGES, key_id)

    def _normalise_models(self, body: KeyCreate | KeyUpdate) -> None:
        """Aliases become catalog ids; an unknown name is a 400 naming ``models``."""
        if body.models is None or self.known_models is None:
            return
        unknown = sorted({m for m in body.models if m not in self.known_models})
        if unknown:
            shown = ", ".join(repr(m[:100]) for m in unknown[:10])
            raise InvalidRequest(f"Unknown models in 'models': {shown}.", param="models")
        body.models = sorted({self.known_models[m] for m in body.models})

    async def create(self, body: KeyCreate) -> tuple[ApiKey, str]:
        self._normalise_models(body)
        plaintext = new_key()
        key_id = "key_" + secrets.token_hex(8)
        fields = {
            "id": key_id,
            "name": body.name,
            "prefix": plaintext[:10],
            "status": "active",
            "created_at": repr(time.time()),
            "revoked_at": "",
            "budget_period": body.budget_period,
            "budget_micro": "",
            "expires_at": "",
            "rpm": "",
            "max_concurrent": "",
            "models": "",
        }
        fields.update(_fields(body, body.model_fields_set - {"name", "budget_period"}))
        await self.redis.hset(meta_key(key_id), mapping=fields)
        await self.redis.set(hash_index_key(hash_key(plaintext)), key_id)
        await self.redis.sadd(IDS_SET, key_id)
        return ApiKey.from_hash(fields), plaintext

    async def get(self, key_id: str) -> ApiKey:
        raw = await self.redis.hgetall(meta_key(key_id)) if len(key_id) <= 64 else {}
        if not raw:
            raise NotFound(f"No key with id '{key_id[:64]}'.", param="id")
        return ApiKey.from_hash(raw)

    async def list(self) -> list[ApiKey]:
        ids = sorted(await self.redis.smembers(IDS_SET))
        keys = []
        for key_id in ids:
            raw = await self.redis.hgetall(meta_key(key_id))
            if raw:
                keys.append(ApiKey.from_hash(raw))
        return sorted(keys, key=lambda k: k.created_at)

    async def update(self, key_id: str, body: KeyUpdate) -> ApiKey:
        await self.get(key_id)
        if "name" in body.model_fields_set and body.name is None:
            raise InvalidRequest("name cannot be null.", param="name")
        if "budget_period" in body.model_fields_set and body.budget_period is None:
            raise InvalidRequest("budget_period cannot be null.", param="budget_period")
        self._normalise_models(body)
        fields = _fields(body, set(body.model_fields_set))
        if fields:
            await self.redis.hset(meta_key(key_id), mapping=fields)
            await self._changed(key_id)
        return await self.get(key_id)

    async def revoke(self, key_id: str) -> ApiKey:
        key = await self.get(key_id)
        if key.status != "revoked":
            await self.redis.hset(
                meta_key(key_id), mapping={"status": "revoked", "revoked_at": repr(time.time())}
            )
            await self._changed(key_id)
        return await self.get(key_id)

    async def authenticate(self, plaintext: str, *, cache_ttl_s: float = 0.0) -> ApiKey:
        """The usable key behind a presented secret, or 401.

        A short in-process cache saves a round trip per request. It is dropped on every key
        change (Redis pub/sub, heard by every process) and used only while this process is
        subscribed, so a revocation, expiry, new budget or model list applies on the next
        request everywhere; ``cache_ttl_s`` only bounds an entry's age. The admission step
        re-checks the key's status atomically before any work is done anyway.
        """
        if not plaintext.startswith(KEY_PREFIX) or len(plaintext) > 200:
            raise Unauthorized("Invalid API key.")
        digest = hash_key(plaintext)
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            key = cached[1]
        else:
            generation = self._generation
            key_id = await self.redis.get(hash_index_key(digest))
            raw = await self.redis.hgetall(meta_key(key_id)) if key_id else {}
            if not raw:
                raise Unauthorized("Invalid API key.")
            key = ApiKey.from_hash(raw)
            if cache_ttl_s > 0 and self._cache_enabled and generation == self._generation:
                if len(self._cache) > 10_000:
                    self._cache.clear()
                self._cache[digest] = (now + cache_ttl_s, key)
        key.check_usable()
        return key

    async def lookup(self, plaintext: str) -> ApiKey:
        """The record behind a presented secret as stored now, whatever its status; 401 only
        for a secret that is no key at all (the Sapiom control plane answers a revoked or
        expired key with a denied transaction rather than a 401)."""
        if not plaintext.startswith(KEY_PREFIX) or len(plaintext) > 200:
            raise Unauthorized("Invalid API key.")
        key_id = await self.redis.get(hash_index_key(hash_key(plaintext)))
        raw = await self.redis.hgetall(meta_key(key_id)) if key_id else {}
        if not raw:
            raise Unauthorized("Invalid API key.")
        return ApiKey.from_hash(raw)
