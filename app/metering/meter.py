"""The meter: admit (key, rate limits, budget, hold) in one atomic step, then settle or release.

Invariant: for every key, settled spend of the current period plus everything held never
exceeds the budget, whatever the number of concurrent requests and gateway processes. It holds
because the check and the hold are one Lua script on the key's own Redis slot, and a hold is
resolved (settled or released) exactly once, by whoever removes it from ``{k:<id>}:holds``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from app.catalog.pricing import Price
from app.errors import BudgetExceeded, NotFound, RateLimited, Unauthorized
from app.metering import keyspace
from app.metering.lua import LuaScript, ScriptCall, store_errors, text
from app.metering.periods import PeriodStarts, iso, period_bounds
from app.money import format_usd
from app.ratelimit.headers import rate_limit_headers
from app.settings import Settings

_UNAUTHORIZED = {
    "unknown": "Invalid API key.",
    "revoked": "This API key has been revoked.",
    "expired": "This API key has expired.",
}


@dataclass(frozen=True)
class AdmitRequest:
    """What a request asks of the meter: hold ``estimate`` on ``key_id`` for this call."""

    key_id: str
    request_id: str
    model: str
    operation: str
    estimate: Price
    endpoint: str


@dataclass(frozen=True)
class Admission:
    """An admitted request: its hold and the rate-limit headers for the success response."""

    request_id: str
    key_id: str
    hold: int  # micro-dollars held
    remaining: int | None  # budget left after the hold; None = unlimited
    headers: dict[str, str] = field(default_factory=dict)
    model: str = ""
    operation: str = ""
    endpoint: str = ""


@dataclass(frozen=True)
class Settlement:
    """How a hold was resolved.

    ``already_resolved`` is true when something else (a sweeper, an earlier retry) resolved
    the hold first; ``charged``/``released`` then report what was recorded at that time.
    """

    charged: int
    released: int
    remaining: int | None
    already_resolved: bool = False


def _int(value: Any) -> int:
    return int(text(value))


def _remaining(value: Any) -> int | None:
    remaining = _int(value)
    return None if remaining < 0 else remaining


class Meter:
    """Holds, settles and releases money against keys' budgets; enforces per-key rate limits.

    ``clock`` (epoch seconds) exists for tests of the rate-limit arithmetic; by default every
    script reads Redis's own ``TIME``, so all gateway processes share one clock.
    """

    def __init__(
        self,
        redis: Any,
        settings: Settings,
        process_id: str,
        *,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.process_id = process_id
        self._clock = clock
        self._admit = LuaScript(redis, __package__, "admit.lua")
        self._resolve = LuaScript(redis, __package__, "resolve.lua")
        self._attach = LuaScript(redis, __package__, "attach.lua")

    def _now(self) -> tuple[str, float]:
        """(``now_us`` argument for the scripts, epoch seconds for the period boundaries)."""
        if self._clock is None:
            return "", time.time()
        now = self._clock()
        return str(int(now * 1_000_000)), now

    async def admit(
        self,
        *,
        key_id: str,
        request_id: str,
        model: str,
        operation: str,
        estimate: Price,
        endpoint: str,
    ) -> Admission:
        """Check the key, its rate limits and budget, and hold ``estimate.amount``: one step.

        Raises ``Unauthorized`` (unknown/revoked/expired key), ``RateLimited`` (429 with
        ``Retry-After`` and ``RateLimit-*``), ``BudgetExceeded`` (402 with ``estimate_usd`` and
        ``remaining_usd``) or ``Unavailable`` (Redis unreachable). Calling it again with the same
        ``request_id`` returns the existing admission instead of holding twice.
        """
        request = AdmitRequest(key_id, request_id, model, operation, estimate, endpoint)
        call = self.admit_call(request)
        with store_errors():
            reply = await call.script(call.keys, call.args)
        return self.admission_from(reply, request)

    def admit_call(self, request: AdmitRequest) -> ScriptCall:
        """The admission script for :meth:`admit`, to run together with other scripts."""
        now_us, now = self._now()
        starts = PeriodStarts.at(now)
        args: list[str | int | float] = [
            request.key_id,
            request.request_id,
            now_us,
            request.estimate.amount,
            request.estimate.pixels,
            request.estimate.unit_price,
            request.model,
            request.operation,
            request.endpoint,
            self.process_id,
            self.settings.default_rpm,
            self.settings.default_max_concurrent,
            starts.day,
            starts.month,
        ]
        keys = [
            keyspace.meta(request.key_id),
            keyspace.gcra(request.key_id),
            keyspace.inflight(request.key_id),
            keyspace.budget(request.key_id),
            keyspace.holds(request.key_id),
            keyspace.ledger(request.key_id),
        ]
        return self._admit.call(keys, args)

    def admission_from(self, reply: Any, request: AdmitRequest) -> Admission:
        """Interpret the admission script's reply: the admission, or the refusal raised."""
        if isinstance(reply, Exception):
            with store_errors():
                raise reply
        outcome = text(reply[0])
        if outcome == "ok":
            return Admission(
                request_id=request.request_id,
                key_id=request.key_id,
                hold=request.estimate.amount,
                remaining=_remaining(reply[1]),
                headers=rate_limit_headers(_int(reply[2]), _int(reply[3]), _int(reply[4])),
                model=request.model,
                operation=request.operation,
                endpoint=request.endpoint,
            )
        if outcome == "unauthorized":
            raise Unauthorized(_UNAUTHORIZED.get(text(reply[1]), "Invalid API key."))
        if outcome == "rate":
            kind, retry_after, limit = text(reply[1]), _int(reply[2]), _int(reply[6])
            headers = rate_limit_headers(
                _int(reply[3]), _int(reply[4]), _int(reply[5]), retry_after_s=retry_after
            )
            if kind == "concurrency":
                message = (
                    f"Too many requests in flight for this key (limit {limit}); "
                    "retry when one finishes."
                )
            else:
                message = (
                    f"Rate limit of {limit} requests per minute exceeded; "
                    f"retry after {retry_after} s."
                )
            raise RateLimited(message, headers=headers, extra={"limit_type": kind})
        if outcome == "budget":
            remaining = _int(reply[1])
            raise BudgetExceeded(
                f"This request is estimated at {format_usd(request.estimate.amount)} USD but only "
                f"{format_usd(remaining)} USD of the key's budget remains.",
                headers=rate_limit_headers(_int(reply[2]), _int(reply[3]), _int(reply[4])),
                extra={
                    "estimate_usd": format_usd(request.estimate.amount),
                    "remaining_usd": format_usd(remaining),
                },
            )
        raise RuntimeError(f"unexpected admit reply {reply!r}")  # pragma: no cover

    async def attach_upstream(self, admission: Admission, fal_request_id: str) -> bool:
        """Record fal's request id on the hold (so a sweeper can ask fal after a crash).

        Returns False when the hold no longer exists (a sweeper resolved it because this
        process looked dead): the caller should cancel the upstream request.
        """
        with store_errors():
            done = await self._attach(
                [keyspace.holds(admission.key_id)], [admission.request_id, fal_request_id]
            )
        return bool(_int(done))

    async def settle(self, admission: Admission, actual: Price) -> Settlement:
        """Charge ``min(actual, hold)``, release the rest, free the in-flight slot. Exactly once."""
        return await self.resolve_hold(
            admission.key_id,
            admission.request_id,
            settle=True,
            amount=actual.amount,
            pixels=actual.pixels,
            reason="completed",
        )

    async def release(self, admission: Admission, reason: str) -> None:
        """Release the whole hold (failure, cancellation). Exactly once; a no-op if resolved."""
        await self.resolve_hold(admission.key_id, admission.request_id, settle=False, reason=reason)

    async def resolve_hold(
        self,
        key_id: str,
        request_id: str,
        *,
        settle: bool,
        amount: int | None = None,
        pixels: int | None = None,
        reason: str = "",
    ) -> Settlement:
        """Settle (``amount`` None = the hold amount) or release a hold by its ids."""
        call = self.resolve_call(
            key_id, request_id, settle=settle, amount=amount, pixels=pixels, reason=reason
        )
        with store_errors():
            reply = await call.script(call.keys, call.args)
        return self.settlement_from(reply)

    def settle_call(self, admission: Admission, actual: Price) -> ScriptCall:
        """:meth:`settle` as a script call, to run together with other scripts."""
        return self.resolve_call(
            admission.key_id,
            admission.request_id,
            settle=True,
            amount=actual.amount,
            pixels=actual.pixels,
            reason="completed",
        )

    def release_call(self, admission: Admission, reason: str) -> ScriptCall:
        """:meth:`release` as a script call, to run together with other scripts."""
        return self.resolve_call(
            admission.key_id, admission.request_id, settle=False, reason=reason
        )

    def resolve_call(
        self,
        key_id: str,
        request_id: str,
        *,
        settle: bool,
        amount: int | None = None,
        pixels: int | None = None,
        reason: str = "",
    ) -> ScriptCall:
        """The resolve script (settle or release one hold, exactly once)."""
        now_us, now = self._now()
        starts = PeriodStarts.at(now)
        keys = [
            keyspace.meta(key_id),
            keyspace.inflight(key_id),
            keyspace.budget(key_id),
            keyspace.holds(key_id),
            keyspace.ledger(key_id),
        ]
        args: list[str | int | float] = [
            key_id,
            request_id,
            now_us,
            "settle" if settle else "release",
            "" if amount is None else amount,
            "" if pixels is None else pixels,
            reason,
            starts.day,
            starts.month,
            self.process_id,
        ]
        return self._resolve.call(keys, args)

    def settlement_from(self, reply: Any) -> Settlement:
        """Interpret the resolve script's reply (see :meth:`resolve_call`)."""
        if isinstance(reply, Exception):
            with store_errors():
                raise reply
        if text(reply[0]) == "missing":
            return Settlement(0, 0, _remaining(reply[1]), already_resolved=True)
        return Settlement(
            charged=_int(reply[1]),
            released=_int(reply[2]),
            remaining=_remaining(reply[3]),
            already_resolved=bool(_int(reply[4])),
        )

    async def usage(self, key_id: str) -> dict[str, Any]:
        """The key's budget, period, spend, holds and limits (``GET /v1/usage``)."""
        now = self._clock() if self._clock else time.time()
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(keyspace.meta(key_id))
            pipe.hgetall(keyspace.budget(key_id))
            pipe.hlen(keyspace.inflight(key_id))
            with store_errors():
                raw_meta, raw_budget, in_flight = await pipe.execute()
        meta = {text(k): text(v) for k, v in raw_meta.items()}
        if not meta:
            raise NotFound(f"Unknown key '{key_id}'.")
        counters = {text(k): _int(v) for k, v in raw_budget.items()}
        period = meta.get("budget_period") or "total"  # as admit.lua reads it
        starts = PeriodStarts.at(now)
        spent = counters.get(
            {"daily": f"d:{starts.day}", "monthly": f"m:{starts.month}"}.get(period, "total"), 0
        )
        held = counters.get("held", 0)
        budget = int(meta["budget_micro"]) if meta.get("budget_micro") else None
        start, end = period_bounds(period, now)
        rpm = meta.get("rpm") or self.settings.default_rpm
        max_concurrent = meta.get("max_concurrent") or self.settings.default_max_concurrent
        return {
            "key_id": key_id,
            "budget_usd": None if budget is None else format_usd(budget),
            "period": period,
            "period_start": iso(start),
            "period_end": iso(end),
            "spent_usd": format_usd(spent),
            "held_usd": format_usd(held),
            "remaining_usd": (
                None if budget is None else format_usd(max(0, budget - spent - held))
            ),
            "in_flight": int(in_flight),
            "limits": {"rpm": int(rpm), "max_concurrent": int(max_concurrent)},
        }
