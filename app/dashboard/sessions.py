"""Dashboard sign-in sessions, kept in Redis so every gateway process shares them.

The browser holds only a random session id (an ``HttpOnly``, ``SameSite=Strict`` cookie,
``Secure`` over TLS); the admin token or gateway key it signed in with is never stored in the
browser, nor in Redis (a team session keeps the key's id, an operator session a fingerprint of
the admin token, so changing the token signs every operator out). Redis stores only the
SHA-256 of the session id, under ``falgate:dashboard:session:<sha256>``: a hash with ``role``
(``operator`` | ``team``), ``key_id``, ``csrf`` and ``admin_fp``, expiring after
:data:`SESSION_TTL_S`.

Every change (a POST) carries the session's CSRF token in a hidden form field; sign-in itself is
protected by a double-submit cookie, since there is no session yet.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any, Literal

from app.metering.lua import text

Role = Literal["operator", "team"]
SESSION_COOKIE = "falgate_dashboard"
LOGIN_COOKIE = "falgate_dashboard_login"
COOKIE_PATH = "/dashboard"
SESSION_TTL_S = 8 * 3600


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def _store_key(session_id: str) -> str:
    return f"falgate:dashboard:session:{_digest(session_id)}"


def admin_fingerprint(admin_token: str) -> str:
    return _digest("falgate-dashboard:" + admin_token)


def tokens_match(presented: str | None, expected: str) -> bool:
    """Constant-time comparison; a missing value never matches."""
    if not presented or not expected:
        return False
    return hmac.compare_digest(presented.encode(), expected.encode())


@dataclass(frozen=True)
class Session:
    role: Role
    csrf: str
    key_id: str = ""
    admin_fp: str = ""

    @property
    def is_operator(self) -> bool:
        return self.role == "operator"


class SessionStore:
    def __init__(self, redis: Any) -> None:
        self.redis = redis

    async def create(self, session: Session) -> str:
        """Store ``session``; returns the new session id for the cookie."""
        session_id = secrets.token_urlsafe(32)
        fields = {
            "role": session.role,
            "csrf": session.csrf,
            "key_id": session.key_id,
            "admin_fp": session.admin_fp,
        }
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(_store_key(session_id), mapping=fields)
            pipe.expire(_store_key(session_id), SESSION_TTL_S)
            await pipe.execute()
        return session_id

    async def get(self, session_id: str | None) -> Session | None:
        if not session_id or len(session_id) > 128:
            return None
        raw = await self.redis.hgetall(_store_key(session_id))
        fields = {text(k): text(v) for k, v in raw.items()}
        role = fields.get("role")
        if role not in ("operator", "team") or not fields.get("csrf"):
            return None
        return Session(
            role="operator" if role == "operator" else "team",
            csrf=fields["csrf"],
            key_id=fields.get("key_id", ""),
            admin_fp=fields.get("admin_fp", ""),
        )

    async def delete(self, session_id: str | None) -> None:
        if session_id and len(session_id) <= 128:
            await self.redis.delete(_store_key(session_id))


def new_csrf_token() -> str:
    return secrets.token_urlsafe(32)
