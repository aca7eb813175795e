"""What the dashboard shows, read only through the gateway's own services.

Every read is one small method here, so that when usage reports move from scanning the ledger
to rollups (issue 12) only these bodies change, not the routes or templates:

- keys and their limits: :class:`app.keys.service.KeyService`;
- a key's budget, spend in its period, holds, in-flight count: :meth:`Meter.usage`;
- spend by key / model / day and the exports: :mod:`app.metering.reports`;
- holds outstanding: :func:`app.ops.holds.outstanding_holds` (what ``/metrics`` reports);
- requests refused by reason: the ``falgate_http_requests_total`` Prometheus counter this
  process keeps (so: since this process started, this process only).

Amounts stay integer micro-dollars until a template formats them with ``format_usd``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

from app.dashboard.charts import Series, top_series
from app.keys.schemas import KeyCreate, KeyUpdate
from app.keys.service import ApiKey, KeyService
from app.metering import keyspace
from app.metering.lua import text
from app.metering.meter import Meter
from app.metering.reports import (
    GroupBy,
    LedgerEntry,
    export_csv,
    export_jsonl,
    iter_ledger,
    usage_report,
)
from app.money import parse_usd
from app.ops.holds import outstanding_holds
from app.ops.metrics import HoldsSnapshot, Metrics

StackBy = Literal["key", "model"]
ExportFormat = Literal["csv", "jsonl"]
WINDOWS = (30, 90)
REFUSAL_STATUSES = (402, 429, 503)
# Refusals count the client-facing surfaces only (a failing /readyz is a 503 too).
_OPERATIONS_ROUTES = {"/healthz", "/readyz", "/metrics"}


@dataclass(frozen=True)
class KeyView:
    """A key with its current-period money and its effective limits."""

    key: ApiKey
    period: str
    budget: int | None
    spent: int
    held: int
    remaining: int | None
    rpm: int
    max_concurrent: int
    in_flight: int

    @property
    def used(self) -> int:
        return self.spent + self.held


@dataclass(frozen=True)
class SpendRow:
    """One group of a usage report: a key id or a model id."""

    name: str
    label: str
    amount: int
    requests: int
    released: int


@dataclass(frozen=True)
class DailySpend:
    """Spend per UTC day over a window, stacked by key or model."""

    days: list[date]
    series: list[Series]

    @property
    def total(self) -> int:
        return sum(s.total for s in self.series)


@dataclass(frozen=True)
class Overview:
    today: int
    month: int
    window_total: int
    budgets_total: int
    budgets_spent: int
    budgeted_keys: int
    active_keys: int
    daily: DailySpend
    top_keys: list[SpendRow]
    top_models: list[SpendRow]
    refusals: dict[int, int]
    holds: HoldsSnapshot


@dataclass(frozen=True)
class KeyDetail:
    view: KeyView
    daily: DailySpend
    by_model: list[SpendRow]
    window_total: int
    entries: list[LedgerEntry] = field(default_factory=list)


def utc_today() -> date:
    return datetime.now(UTC).date()


def _midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def window_days(days: int, today: date | None = None) -> list[date]:
    """The last ``days`` UTC days, oldest first, ending today."""
    last = today or utc_today()
    return [last - timedelta(days=days - 1 - i) for i in range(days)]


class DashboardService:
    """Reads for the dashboard pages, and the key changes it may make (through KeyService)."""

    def __init__(self, keys: KeyService, meter: Meter, metrics: Metrics) -> None:
        self.keys = keys
        self.meter = meter
        self.metrics = metrics
        self.redis: Any = meter.redis

    # --- keys -----------------------------------------------------------------
    async def key_view(self, key: ApiKey) -> KeyView:
        usage = await self.meter.usage(key.id)

        def micro(name: str) -> int | None:
            value = usage.get(name)
            return None if value is None else parse_usd(value)

        return KeyView(
            key=key,
            period=str(usage["period"]),
            budget=micro("budget_usd"),
            spent=micro("spent_usd") or 0,
            held=micro("held_usd") or 0,
            remaining=micro("remaining_usd"),
            rpm=int(usage["limits"]["rpm"]),
            max_concurrent=int(usage["limits"]["max_concurrent"]),
            in_flight=int(usage["in_flight"]),
        )

    async def key_views(self) -> list[KeyView]:
        return [await self.key_view(key) for key in await self.keys.list()]

    async def key(self, key_id: str) -> KeyView:
        return await self.key_view(await self.keys.get(key_id))

    async def create_key(self, body: KeyCreate) -> tuple[ApiKey, str]:
        return await self.keys.create(body)

    async def update_key(self, key_id: str, body: KeyUpdate) -> ApiKey:
        return await self.keys.update(key_id, body)

    async def revoke_key(self, key_id: str) -> ApiKey:
        return await self.keys.revoke(key_id)

    # --- spend (ledger reports today; rollups later) ---------------------------
    async def spend_total(
        self, start: datetime | None, key_ids: Sequence[str] | None = None
    ) -> int:
        report = await usage_report(self.redis, key_ids=key_ids, start=start, group_by="key")
        return parse_usd(report["total"]["amount_usd"])

    async def spend_by(
        self,
        group_by: GroupBy,
        start: datetime | None,
        key_ids: Sequence[str] | None = None,
        label: Callable[[str], str] = str,
    ) -> list[SpendRow]:
        """Groups of settled spend, largest first."""
        report = await usage_report(self.redis, key_ids=key_ids, start=start, group_by=group_by)
        rows = [
            SpendRow(
                name=row[group_by],
                label=label(row[group_by]),
                amount=parse_usd(row["amount_usd"]),
                requests=int(row["requests"]),
                released=int(row["released"]),
            )
            for row in report["rows"]
        ]
        return sorted(rows, key=lambda r: (-r.amount, r.name))

    async def daily_spend(
        self,
        days: list[date],
        stack_by: StackBy,
        key_ids: Sequence[str] | None = None,
        label: Callable[[str], str] = str,
    ) -> DailySpend:
        """Settled micro-dollars per day and per key or model over ``days``."""
        by_name: dict[str, dict[date, int]] = {}
        async for entry in iter_ledger(self.redis, key_ids=key_ids, start=_midnight(days[0])):
            if entry.event != "settle" or entry.amount_micro == 0:
                continue
            name = label(entry.key_id if stack_by == "key" else entry.model)
            day = entry.timestamp.date()
            per_day = by_name.setdefault(name, {})
            per_day[day] = per_day.get(day, 0) + entry.amount_micro
        return DailySpend(days=days, series=top_series(by_name))

    async def recent_entries(self, key_id: str, limit: int = 50) -> list[LedgerEntry]:
        """The key's newest ledger entries, newest first."""
        page = await self.redis.xrevrange(keyspace.ledger(key_id), count=limit)
        return [
            LedgerEntry.from_stream(text(entry_id), {text(k): text(v) for k, v in fields.items()})
            for entry_id, fields in page
        ]

    def export(self, key_id: str, fmt: ExportFormat) -> AsyncIterator[str]:
        entries = iter_ledger(self.redis, key_ids=[key_id])
        return export_csv(entries) if fmt == "csv" else export_jsonl(entries)

    # --- operations -------------------------------------------------------------
    def refusals(self) -> dict[int, int]:
        """Requests this process refused with 402, 429 and 503 since it started."""
        counts = dict.fromkeys(REFUSAL_STATUSES, 0)
        for metric in self.metrics.requests.collect():
            for sample in metric.samples:
                if not sample.name.endswith("_total"):
                    continue
                status = sample.labels.get("status", "")
                if not status.isdigit() or int(status) not in counts:
                    continue
                if sample.labels.get("route") in _OPERATIONS_ROUTES:
                    continue
                counts[int(status)] += int(sample.value)
        return counts

    async def holds(self) -> HoldsSnapshot:
        return await outstanding_holds(self.redis)

    # --- pages ----------------------------------------------------------------------
    async def overview(self, days: int, stack_by: StackBy) -> Overview:
        views = await self.key_views()
        names = key_labels([v.key for v in views])

        def label(key_id: str) -> str:
            return names.get(key_id, key_id)

        today = utc_today()
        window = window_days(days, today)
        active = [v for v in views if v.key.effective_status() == "active"]
        budgeted = [v for v in active if v.budget is not None]
        return Overview(
            today=await self.spend_total(_midnight(today)),
            month=await self.spend_total(_midnight(today.replace(day=1))),
            window_total=await self.spend_total(_midnight(window[0])),
            budgets_total=sum(v.budget or 0 for v in budgeted),
            budgets_spent=sum(v.spent for v in budgeted),
            budgeted_keys=len(budgeted),
            active_keys=len(active),
            daily=await self.daily_spend(window, stack_by, label=label),
            top_keys=(await self.spend_by("key", _midnight(window[0]), label=label))[:10],
            top_models=(await self.spend_by("model", _midnight(window[0])))[:10],
            refusals=self.refusals(),
            holds=await self.holds(),
        )

    async def key_detail(self, key: ApiKey, days: int, *, entries: int = 50) -> KeyDetail:
        window = window_days(days)
        start = _midnight(window[0])
        return KeyDetail(
            view=await self.key_view(key),
            daily=await self.daily_spend(window, "model", key_ids=[key.id]),
            by_model=await self.spend_by("model", start, key_ids=[key.id]),
            window_total=await self.spend_total(start, key_ids=[key.id]),
            entries=await self.recent_entries(key.id, entries),
        )


def key_labels(keys: Sequence[ApiKey]) -> dict[str, str]:
    """Key id -> its name, with the id added where two keys share a name."""
    counts: dict[str, int] = {}
    for key in keys:
        counts[key.name] = counts.get(key.name, 0) + 1
    return {k.id: k.name if counts[k.name] == 1 else f"{k.name} ({k.id})" for k in keys}
