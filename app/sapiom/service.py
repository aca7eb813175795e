"""The Sapiom control plane: transactions that authorise one request each (SPEC section 12).

A Sapiom-wrapped HTTP client asks its control plane to authorise every request before sending
it, and then sends the request with ``X-Sapiom-Transaction-Id`` and no credentials of its own
(``sapiom-protocol.md``). With falgate as both control plane and target, a transaction is a
short-lived, single-use credential for exactly the request it was created for:

- its id is ``stx_<key id>_<32 random hex digits>``: the gateway generates it, the key id says
  where it is stored, the random part is the secret;
- it is stored as ``{k:<key id>}:sapiom:tx:<sha256 of the random part>`` (a hash: ``status``,
  ``method``, ``url``, ``used``, ``reason``, ``outcome``) under the key's hash tag, expiring after
  ``FALGATE_SAPIOM_TRANSACTION_TTL_S`` (5 minutes) by Redis's own clock;
- presenting it consumes it atomically (``redeem.lua``), whatever the outcome; it authenticates
  only the method and URL the SDK declared, compared after normalising scheme and host case and
  default ports, the URL of the presenting request being the one it was sent to: the
  configured ``FALGATE_PUBLIC_URL`` (behind a proxy) or its own scheme and ``Host``.

A transaction never carries money: the request it authorises goes through the ordinary money
path, and the key's status and budget are read again when it is used.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit

from app.errors import InvalidRequest, NotFound, Unauthorized
from app.keys.service import ApiKey, KeyService
from app.metering.lua import LuaScript, optional_text, store_errors, text
from app.metering.meter import Meter
from app.money import parse_usd
from app.ops.redis_topology import RedisLike
from app.sapiom.schemas import (
    IdentityToken,
    TransactionComplete,
    TransactionCreate,
    TransactionOut,
    TransactionStatus,
)

_ID = re.compile(r"stx_(key_[A-Za-z0-9]{1,64})_([0-9a-f]{32})")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_IDENTITY_LIFETIME_S = 365 * 86_400
_STORE = "The gateway's state store"

# Why a presented transaction does not authenticate, by what redeem.lua answered.
_REFUSED = {
    "unknown": "Unknown or expired Sapiom transaction.",
    "used": "This Sapiom transaction was already used; each one authorizes a single request.",
    "mismatch": "This Sapiom transaction authorized a different method or URL.",
    "denied": "This Sapiom transaction was denied.",
    "completed": "This Sapiom transaction is already completed.",
}


@dataclass(frozen=True)
class TransactionId:
    """A transaction id: the key it belongs to and its secret part."""

    key_id: str
    secret: str

    @classmethod
    def new(cls, key_id: str) -> TransactionId:
        return cls(key_id, secrets.token_hex(16))

    @classmethod
    def parse(cls, value: str) -> TransactionId | None:
        match = _ID.fullmatch(value.strip())
        return cls(match[1], match[2]) if match else None

    def __str__(self) -> str:
        return f"stx_{self.key_id}_{self.secret}"

    @property
    def storage_key(self) -> str:
        digest = hashlib.sha256(self.secret.encode()).hexdigest()
        return f"{{k:{self.key_id}}}:sapiom:tx:{digest}"


def normalise_url(url: str) -> str | None:
    """``HTTP://Gw:80/v1/run/x?a=1#f`` -> ``http://gw/v1/run/x?a=1``; None if not http(s).

    What the WHATWG URL parser (the SDK's ``request.url``) already does, so that the same URL
    compares equal however it was spelled; the path and query are kept byte for byte.
    """
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = parts.hostname
    if scheme not in _DEFAULT_PORTS or not host:
        return None
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port is None or port == _DEFAULT_PORTS[scheme] else f"{host}:{port}"
    query = f"?{parts.query}" if parts.query else ""
    return f"{scheme}://{netloc}{parts.path or '/'}{query}"


def served_url(
    *,
    scheme: str,
    host: str | None,
    raw_path: str,
    query: str,
    public_url: str | None,
) -> str | None:
    """The URL a request was sent to, as its client wrote it: under ``public_url`` when the
    gateway is reached through a proxy, else the request's own scheme and ``Host``."""
    target = raw_path + (f"?{query}" if query else "")
    if public_url:
        return normalise_url(public_url.rstrip("/") + target)
    if not host:
        return None
    return normalise_url(f"{scheme}://{host}{target}")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class SapiomService:
    """Creates, reads, completes and redeems transactions for the control-plane routes and
    for authentication (``app.deps.current_key``)."""

    def __init__(
        self,
        redis: RedisLike,
        keys: KeyService,
        meter: Meter,
        *,
        ttl_s: float,
        public_url: str | None,
    ) -> None:
        self.keys = keys
        self.meter = meter
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.public_url = public_url
        self._create = LuaScript(redis, __package__, "create.lua")
        self._redeem = LuaScript(redis, __package__, "redeem.lua")
        self._complete = LuaScript(redis, __package__, "complete.lua")
        self._redis = redis
        # Signs the identity tokens of ``POST /v1/auth/tokens``; nothing ever verifies them.
        self._identity_secret = secrets.token_bytes(32)

    def request_url(
        self, *, scheme: str, host: str | None, raw_path: str, query: str
    ) -> str | None:
        """The URL a request presenting a transaction was sent to (see :func:`served_url`)."""
        return served_url(
            scheme=scheme, host=host, raw_path=raw_path, query=query, public_url=self.public_url
        )

    async def _denial(self, key: ApiKey) -> str | None:
        """Why ``key`` may not start a request now, or None: revoked, expired, no budget left."""
        status = key.effective_status()
        if status != "active":
            return f"This API key is {status}."
        if key.budget_micro is None:
            return None
        remaining = (await self.meter.usage(key.id))["remaining_usd"]
        if remaining is not None and parse_usd(remaining) <= 0:
            return "This API key has no budget left in the current period."
        return None

    async def create(self, key: ApiKey, body: TransactionCreate) -> TransactionOut:
        """Authorise (or deny) the one request described by ``body`` for ``key``."""
        facts = body.request_facts.request
        url = normalise_url(facts.url)
        if url is None:
            raise InvalidRequest(
                "requestFacts.request.url must be an absolute http(s) URL.",
                param="requestFacts.request.url",
            )
        reason = await self._denial(key)
        status: TransactionStatus = "authorized" if reason is None else "denied"
        transaction_id = TransactionId.new(key.id)
        with store_errors(_STORE):
            await self._create(
                [transaction_id.storage_key],
                [status, facts.method.upper(), url, self.ttl_ms, reason or ""],
            )
        return TransactionOut(id=str(transaction_id), status=status, reason=reason)

    def _own(self, key: ApiKey, transaction_id: str) -> TransactionId:
        parsed = TransactionId.parse(transaction_id)
        if parsed is None or parsed.key_id != key.id:
            raise NotFound("No such transaction.", param="id")
        return parsed

    async def get(self, key: ApiKey, transaction_id: str) -> TransactionOut:
        """The status of one of ``key``'s transactions (404 for anyone else's or an expired one)."""
        parsed = self._own(key, transaction_id)
        with store_errors(_STORE):
            status, reason = await self._redis.hmget(parsed.storage_key, ["status", "reason"])
        if status is None:
            raise NotFound("No such transaction (or it expired).", param="id")
        return TransactionOut.model_validate(
            {"id": str(parsed), "status": text(status), "reason": optional_text(reason) or None}
        )

    async def complete(
        self, key: ApiKey, transaction_id: str, body: TransactionComplete
    ) -> TransactionOut:
        """Record that the SDK finished the request; the id can authenticate nothing after."""
        parsed = self._own(key, transaction_id)
        with store_errors(_STORE):
            reply = await self._complete([parsed.storage_key], [body.outcome or ""])
        if reply is None:
            raise NotFound("No such transaction (or it expired).", param="id")
        return TransactionOut.model_validate({"id": str(parsed), "status": text(reply)})

    async def redeem(
        self, transaction_id: str, *, method: str, url: str | None, presented: ApiKey | None
    ) -> ApiKey:
        """The key a request carrying ``X-Sapiom-Transaction-Id`` acts as, consuming the id.

        ``presented`` is the key the request also authenticated with, if any: then the
        transaction must be that key's own. Anything else is a 401; so is a key revoked or
        expired since the transaction was created (read again now, never from a cache).
        """
        parsed = TransactionId.parse(transaction_id)
        if parsed is None:
            raise Unauthorized(_REFUSED["unknown"])
        if presented is not None and presented.id != parsed.key_id:
            raise Unauthorized("This Sapiom transaction belongs to another API key.")
        with store_errors(_STORE):
            outcome = text(await self._redeem([parsed.storage_key], [method.upper(), url or ""]))
        if outcome != "ok":
            raise Unauthorized(_REFUSED.get(outcome, _REFUSED["unknown"]))
        try:
            key = await self.keys.get(parsed.key_id)
        except NotFound as exc:
            raise Unauthorized(_REFUSED["unknown"]) from exc
        key.check_usable()
        return key

    def identity_token(self, key: ApiKey) -> IdentityToken:
        """A signed JWT naming ``key``, so 0.5.x SDKs cache an identity and stop asking."""
        now = int(time.time())
        expires = now + _IDENTITY_LIFETIME_S
        header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        claims = {"iss": "falgate", "sub": key.id, "aud": "falgate", "iat": now, "exp": expires}
        payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
        signing_input = f"{header}.{payload}".encode()
        signature = _b64(hmac.new(self._identity_secret, signing_input, hashlib.sha256).digest())
        expires_at = datetime.fromtimestamp(expires, UTC).isoformat(timespec="milliseconds")
        return IdentityToken(
            identity=f"{header}.{payload}.{signature}",
            identity_expires_at=expires_at.replace("+00:00", "Z"),
        )
