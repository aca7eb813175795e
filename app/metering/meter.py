"""The meter: admit (key, rate limits, budget, hold) in one atomic step, then settle or release.

Invariant: for every key, settled spend of the current period plus everything held never
exceeds the budget, whatever the number of concurrent requests and gateway processes. It holds
because the check and the hold are one Lua script on the key's own Redis slot, and a hold is
resolved (settled or released) exactly once, by whoever removes it from ``{k:<id>}:holds``.

A hold's life (SPEC section 10): ``held`` (admitted) -> ``submitted`` (fal accepted the job and
its id is recorded) -> settled | released, or ``unresolved`` (the request path gave up after
fal accepted it) -> settled | released by the resolver from fal's answer. Every hold has a lease
in ``{k:<id>}:leases`` renewed while its request lives; the resolver takes the ones whose lease
ran out. Every time that decides money is Redis's ``TIME``, read inside the scripts.

One exception to the invariant, in favour of the ledger: a hold the resolver released as
abandoned (no fal id when its lease ran out) whose request was alive after all and whose job
fal accepted is put back when fal's id or images reach Redis (``reinstate.lua``), even if the
released money was admitted to other requests meanwhile. fal did the work; it is recorded.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import RedisCluster

from app.catalog.pricing import Price
from app.errors import BudgetExceeded, NotFound, RateLimited, Unauthorized, Unavailable
from app.metering import keyspace
from app.metering.lua import LuaScript, ScriptCall, run_together, store_errors, text
from app.metering.multiplex import ScriptClient
from app.metering.periods import iso, period_bounds
from app.money import format_usd
from app.ops.metrics import record_reinstated
from app.ratelimit.headers import rate_limit_headers
from app.settings import Settings
from app.upstream.types import GeneratedImage

_UNAUTHORIZED = {
    "unknown": "Invalid API key.",
    "revoked": "This API key has been revoked.",
    "expired": "This API key has expired.",
}
_MONEY = ("clock.lua",)
# The scripts that meet fal's answer for a hold, which may find it abandoned (reinstate.lua).
_ANSWERS = ("clock.lua", "reinstate.lua")
#: The resolver's reason for releasing a hold whose lease ran out before fal's request id was
#: recorded; such a hold is put back if its request turns out to be alive (reinstate.lua).
ABANDONED = "abandoned"

log = logging.getLogger("falgate.metering")


def note_reinstated(request_id: str, fal_request_id: str | None) -> None:
    """Say that a hold released as abandoned was put back (``reinstate.lua``): its process was
    stalled or cut off from Redis for longer than a lease, and the key may be over budget."""
    log.warning(
        "request %s was released as abandoned, but fal has its job %s: its hold is put back",
        request_id,
        fal_request_id or "(fal's id unknown)",
    )
    record_reinstated()


@dataclass(frozen=True)
class AdmitRequest:
    """What a request asks of the meter: hold ``estimate`` on ``key_id`` for this call.

    ``request_id`` is the gateway's own id for the request (never a client's value).
    """

    key_id: str
    request_id: str
    model: str
    operation: str
    estimate: Price
    endpoint: str
    prompt: str | None = None


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

    ``already_resolved`` is true when something else (the resolver, an earlier retry) resolved
    the hold first; ``charged``/``released`` then report what was recorded at that time. It is
    also true (with nothing resolved) when the resolver's release of a hold as abandoned found
    that fal's id had been recorded on it meanwhile: the hold is kept, for fal's answer.
    """

    charged: int
    released: int
    remaining: int | None
    already_resolved: bool = False
    reinstated: bool = False  # the settle put back a hold released as abandoned first


@dataclass(frozen=True)
class RequestRecord:
    """What the gateway knows of one request it admitted (``GET /v1/requests/{id}``).

    ``status``: ``pending`` (held or submitted, its request still running), ``unresolved``
    (fal accepted it, the request path gave up, the resolver is asking fal), ``completed``
    (settled), ``failed`` or ``cancelled`` (released).
    """

    request_id: str
    key_id: str
    status: str
    operation: str
    model: str
    upstream_request_id: str | None
    hold: int
    charged: int | None
    pixels: int | None
    images: list[GeneratedImage] | None
    seed: int | None
    prompt: str | None
    remaining: int | None
    created_ms: int

    @property
    def resolved(self) -> bool:
        return self.status in ("completed", "failed", "cancelled")

    @property
    def created_at(self) -> str:
        moment = datetime.fromtimestamp(self.created_ms / 1000, UTC)
        return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _int(value: Any) -> int:
    return int(text(value))


def _remaining(value: Any) -> int | None:
    remaining = _int(value)
    return None if remaining < 0 else remaining


def images_json(images: Sequence[GeneratedImage]) -> str:
    return json.dumps(
        [
            {"url": i.url, "width": i.width, "height": i.height, "content_type": i.content_type}
            for i in images
        ],
        separators=(",", ":"),
    )


def _images(raw: str) -> list[GeneratedImage] | None:
    if not raw:
        return None
    return [
        GeneratedImage(
            url=str(i["url"]),
            width=i.get("width"),
            height=i.get("height"),
            content_type=i.get("content_type"),
        )
        for i in json.loads(raw)
    ]


def _opt_int(raw: str | None) -> int | None:
    return int(raw) if raw not in (None, "") else None


class Meter:
    """Holds, settles and releases money against keys' budgets; enforces per-key rate limits.

    ``clock`` (epoch seconds) exists for tests of the rate-limit and period arithmetic; by
    default every script reads Redis's own ``TIME``, so all gateway processes share one clock.
    """

    def __init__(
        self,
        redis: Any,
        settings: Settings,
        process_id: str,
        *,
        clock: Any = None,
        scripts: ScriptClient | None = None,
    ) -> None:
        """``scripts``: what the request path runs its scripts on (``MoneyPath``), by default
        ``redis`` itself."""
        self.redis = redis
        self.scripts: ScriptClient = scripts if scripts is not None else redis
        self.settings = settings
        self.process_id = process_id
        self._clock = clock
        self.lease_ms = max(1000, int(settings.hold_lease_s * 1000))
        self.record_ttl_ms = int(settings.request_record_ttl_s * 1000)
        self._admit = LuaScript(redis, __package__, "admit.lua", prelude=_MONEY)
        self._resolve = LuaScript(redis, __package__, "resolve.lua", prelude=_ANSWERS)
        self._attach = LuaScript(redis, __package__, "attach.lua", prelude=_ANSWERS)
        self._handoff = LuaScript(redis, __package__, "handoff.lua", prelude=_ANSWERS)
        self._renew = LuaScript(redis, __package__, "renew.lua", prelude=_MONEY)

    def _now_us(self) -> str:
        """The scripts' ``now_us`` argument: '' (Redis ``TIME``) unless a test clock is set."""
        return "" if self._clock is None else str(int(self._clock() * 1_000_000))

    async def admit(
        self,
        *,
        key_id: str,
        request_id: str,
        model: str,
        operation: str,
        estimate: Price,
        endpoint: str,
        prompt: str | None = None,
    ) -> Admission:
        """Check the key, its rate limits and budget, and hold ``estimate.amount``: one step.

        Raises ``Unauthorized`` (unknown/revoked/expired key), ``RateLimited`` (429 with
        ``Retry-After`` and ``RateLimit-*``), ``BudgetExceeded`` (402 with ``estimate_usd`` and
        ``remaining_usd``) or ``Unavailable`` (Redis unreachable; the script may or may not
        have run: release the request id to be sure, see :meth:`release_id_call`).
        """
        request = AdmitRequest(key_id, request_id, model, operation, estimate, endpoint, prompt)
        call = self.admit_call(request)
        with store_errors():
            reply = await call.script(call.keys, call.args)
        return self.admission_from(reply, request)

    def admit_call(self, request: AdmitRequest) -> ScriptCall:
        """The admission script for :meth:`admit`, to run together with other scripts."""
        args: list[str | int | float] = [
            request.key_id,
            request.request_id,
            self._now_us(),
            request.estimate.amount,
            request.estimate.pixels,
            request.estimate.unit_price,
            request.model,
            request.operation,
            request.endpoint,
            self.process_id,
            self.settings.default_rpm,
            self.settings.default_max_concurrent,
            self.lease_ms,
            self.record_ttl_ms,
            request.prompt or "",
        ]
        keys = [
            keyspace.meta(request.key_id),
            keyspace.gcra(request.key_id),
            keyspace.inflight(request.key_id),
            keyspace.budget(request.key_id),
            keyspace.holds(request.key_id),
            keyspace.ledger(request.key_id),
            keyspace.leases(request.key_id),
            keyspace.request_record(request.key_id, request.request_id),
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
        if outcome == "stale":
            raise Unavailable(
                "The metering store answered too late; nothing was charged. Try again.",
                headers={"Retry-After": "1"},
            )
        raise RuntimeError(f"unexpected admit reply {reply!r}")  # pragma: no cover

    async def attach_upstream(self, admission: Admission, fal_request_id: str) -> bool:
        """Record fal's request id on the hold (state ``submitted``).

        A hold the resolver released as abandoned meanwhile (its lease ran out: this process
        was stalled or cut off from Redis) is put back with the id, since fal has the job.
        Returns False only when the hold was resolved otherwise: nothing can bill the job,
        and the caller should cancel at fal.
        """
        key_id, request_id = admission.key_id, admission.request_id
        keys = [
            keyspace.holds(key_id),
            keyspace.request_record(key_id, request_id),
            keyspace.budget(key_id),
            keyspace.inflight(key_id),
            keyspace.leases(key_id),
            keyspace.ledger(key_id),
        ]
        args: list[str | int | float] = [
            request_id,
            fal_request_id,
            key_id,
            self.process_id,
            self.lease_ms,
            self._now_us(),
        ]
        (done,) = await run_together(self.scripts, self._attach.call(keys, args))
        if isinstance(done, Exception):
            with store_errors():  # a transient error reply is a 503, any other a bug
                raise done
        if _int(done) == 2:
            note_reinstated(request_id, fal_request_id)
        return bool(_int(done))

    def handed_over(self, reply: Any, admission: Admission, fal_request_id: str | None) -> bool:
        """Interpret the hand-off script's reply (:meth:`unresolved_call`,
        :meth:`detached_call`): False if the hold was already resolved."""
        if isinstance(reply, Exception):
            with store_errors():
                raise reply
        if _int(reply) == 2:
            note_reinstated(admission.request_id, fal_request_id)
        return bool(_int(reply))

    def unresolved_call(self, admission: Admission, fal_request_id: str | None) -> ScriptCall:
        """Mark a hold ``unresolved`` (fal accepted its job, the request path gave up on it):
        the resolver settles or releases it from fal's answer."""
        return self._handoff_call(admission, fal_request_id, "unresolved")

    def detached_call(self, admission: Admission, fal_request_id: str) -> ScriptCall:
        """Hand a job fal's queue accepted to the resolver at once (fal's queue API answers the
        submit without waiting): it is settled when fal finishes, whoever asks for it."""
        return self._handoff_call(admission, fal_request_id, "detached")

    def _handoff_call(
        self, admission: Admission, fal_request_id: str | None, mode: str
    ) -> ScriptCall:
        key_id, request_id = admission.key_id, admission.request_id
        keys = [
            keyspace.holds(key_id),
            keyspace.leases(key_id),
            keyspace.request_record(key_id, request_id),
            keyspace.inflight(key_id),
            keyspace.budget(key_id),
            keyspace.ledger(key_id),
        ]
        args = [request_id, fal_request_id or "", self._now_us(), mode, key_id, self.process_id]
        return self._handoff.call(keys, args)

    async def settle(
        self, admission: Admission, actual: Price, images: Sequence[GeneratedImage] = ()
    ) -> Settlement:
        """Charge ``min(actual, hold)``, release the rest, free the in-flight slot. Exactly once."""
        call = self.settle_call(admission, actual, images)
        with store_errors():
            reply = await call.script(call.keys, call.args)
        return self.settlement_from(reply)

    async def release(self, admission: Admission, reason: str, outcome: str = "failed") -> None:
        """Release the whole hold (failure, cancellation). Exactly once; a no-op if resolved."""
        await self.resolve_hold(
            admission.key_id, admission.request_id, settle=False, reason=reason, outcome=outcome
        )

    async def resolve_hold(
        self,
        key_id: str,
        request_id: str,
        *,
        settle: bool,
        amount: int | None = None,
        pixels: int | None = None,
        reason: str = "",
        images: Sequence[GeneratedImage] = (),
        seed: int | None = None,
        outcome: str = "failed",
    ) -> Settlement:
        """Settle (``amount`` None = the hold amount) or release a hold by its ids."""
        call = self.resolve_call(
            key_id,
            request_id,
            settle=settle,
            amount=amount,
            pixels=pixels,
            reason=reason,
            images=images,
            seed=seed,
            outcome=outcome,
        )
        with store_errors():
            reply = await call.script(call.keys, call.args)
        return self.settlement_from(reply)

    def settle_call(
        self,
        admission: Admission,
        actual: Price,
        images: Sequence[GeneratedImage] = (),
        seed: int | None = None,
        upstream: str | None = None,
    ) -> ScriptCall:
        """:meth:`settle` as a script call, to run together with other scripts."""
        return self.resolve_call(
            admission.key_id,
            admission.request_id,
            settle=True,
            amount=actual.amount,
            pixels=actual.pixels,
            reason="completed",
            images=images,
            seed=seed,
            upstream=upstream,
        )

    def release_call(
        self, admission: Admission, reason: str, outcome: str = "failed"
    ) -> ScriptCall:
        """:meth:`release` as a script call, to run together with other scripts."""
        return self.release_id_call(admission.key_id, admission.request_id, reason, outcome)

    def release_id_call(
        self, key_id: str, request_id: str, reason: str, outcome: str = "failed"
    ) -> ScriptCall:
        """Release by ids: also for an admission whose reply was lost (a tombstone is left if
        it has not run yet, so that it is refused when it does)."""
        return self.resolve_call(key_id, request_id, settle=False, reason=reason, outcome=outcome)

    def resolve_call(
        self,
        key_id: str,
        request_id: str,
        *,
        settle: bool,
        amount: int | None = None,
        pixels: int | None = None,
        reason: str = "",
        images: Sequence[GeneratedImage] = (),
        seed: int | None = None,
        outcome: str = "failed",
        upstream: str | None = None,
    ) -> ScriptCall:
        """The resolve script (settle or release one hold, exactly once)."""
        keys = [
            keyspace.meta(key_id),
            keyspace.inflight(key_id),
            keyspace.budget(key_id),
            keyspace.holds(key_id),
            keyspace.ledger(key_id),
            keyspace.leases(key_id),
            keyspace.request_record(key_id, request_id),
            keyspace.rollup_state(key_id),
            keyspace.rollup_month_prefix(key_id),
        ]
        args: list[str | int | float] = [
            key_id,
            request_id,
            self._now_us(),
            "settle" if settle else "release",
            "" if amount is None else amount,
            "" if pixels is None else pixels,
            reason,
            self.process_id,
            images_json(images) if images else "",
            "" if seed is None else str(seed),
            self.record_ttl_ms,
            outcome,
            upstream or "",
        ]
        return self._resolve.call(keys, args)

    def settlement_from(self, reply: Any) -> Settlement:
        """Interpret the resolve script's reply (see :meth:`resolve_call`)."""
        if isinstance(reply, Exception):
            with store_errors():
                raise reply
        if text(reply[0]) in ("missing", "kept"):
            return Settlement(0, 0, _remaining(reply[1]), already_resolved=True)
        return Settlement(
            charged=_int(reply[1]),
            released=_int(reply[2]),
            remaining=_remaining(reply[3]),
            already_resolved=bool(_int(reply[4])),
            reinstated=bool(_int(reply[5])),
        )

    def renew_call(self, key_id: str, request_ids: Sequence[str]) -> ScriptCall:
        """Renew these live holds' leases (one key's) to Redis's clock plus a lease."""
        return self._renew.call([keyspace.leases(key_id)], [self.lease_ms, *request_ids])

    async def request_record(self, key_id: str, request_id: str) -> RequestRecord | None:
        """The record of one of this key's requests; None if it has none (or it expired)."""
        with store_errors():
            raw = await self.redis.hgetall(keyspace.request_record(key_id, request_id))
        if not raw:
            return None
        rec = {text(k): text(v) for k, v in raw.items()}
        if not rec.get("operation"):  # a tombstone: the request was never admitted
            return None
        return RequestRecord(
            request_id=request_id,
            key_id=key_id,
            status=rec.get("status", "pending"),
            operation=rec["operation"],
            model=rec.get("model", ""),
            upstream_request_id=rec.get("upstream") or None,
            hold=int(rec.get("hold_micro") or 0),
            charged=_opt_int(rec.get("charged_micro")),
            pixels=_opt_int(rec.get("pixels")),
            images=_images(rec.get("images", "")),
            seed=_opt_int(rec.get("seed")),
            prompt=rec.get("prompt") or None,
            remaining=_opt_int(rec.get("remaining_micro")),
            created_ms=int(rec.get("created_ms") or 0),
        )

    async def usage(self, key_id: str) -> dict[str, Any]:
        """The key's budget, period, spend, holds and limits (``GET /v1/usage``).

        The current period is taken from Redis's clock, as the scripts take it.
        """
        with store_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hgetall(keyspace.meta(key_id))
                pipe.hgetall(keyspace.budget(key_id))
                pipe.hlen(keyspace.inflight(key_id))
                if not isinstance(self.redis, RedisCluster):
                    pipe.time()
                replies = await pipe.execute()
            # A cluster pipeline refuses TIME (it has no key): ask one node on its own.
            redis_time = replies[3] if len(replies) > 3 else await self.redis.time()
        raw_meta, raw_budget, in_flight = replies[:3]
        meta = {text(k): text(v) for k, v in raw_meta.items()}
        if not meta:
            raise NotFound(f"Unknown key '{key_id}'.")
        counters = {text(k): _int(v) for k, v in raw_budget.items()}
        now = self._clock() if self._clock else int(redis_time[0]) + int(redis_time[1]) / 1e6
        period = meta.get("budget_period") or "monthly"  # as the scripts read it
        start, end = period_bounds(period, now)
        field_name = "total"
        if start is not None:
            field_name = f"{period[0]}:{int(start.timestamp())}"
        spent = counters.get(field_name, 0)
        held = counters.get("held", 0)
        budget = int(meta["budget_micro"]) if meta.get("budget_micro") else None
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
