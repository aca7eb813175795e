"""Rollups kept by the settle/release script equal a recomputation from the raw ledger, to the
micro-dollar; the one-time backfill counts older entries exactly once; reports stay exact after
the ledger is archived and trimmed from Redis. SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import random
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from app.catalog.pricing import Price
from app.ledger.drainer import Drainer
from app.ledger.export import ExportQuery
from app.ledger.service import LedgerService, shape_report
from app.metering import Meter
from app.upstream.types import GeneratedImage

DAY_S = 86_400
MODELS = ["fal-ai/flux/dev", "fal-ai/flux-pro", "topaz"]


async def add_key(r: Any, key_id: str) -> None:
    await r.hset(f"{{k:{key_id}}}:meta", mapping={"id": key_id, "status": "active"})
    await r.sadd("falgate:keys", key_id)


async def pre_rollup_entries(r: Any, key_id: str, count: int) -> None:
    """Settles and releases as the code before rollups wrote them (no rollup, no image count),
    spread over the last three days."""
    now_ms = int(time.time() * 1000)
    first = now_ms - 3 * DAY_S * 1000
    for i in range(count):
        ms = first + i * (3 * DAY_S * 1000 // count)
        event = "release" if i % 4 == 3 else "settle"
        await r.xadd(
            f"{{k:{key_id}}}:ledger",
            {
                "event": event,
                "key_id": key_id,
                "request_id": f"old_{i}",
                "model": MODELS[i % 3],
                "operation": "upscale" if MODELS[i % 3] == "topaz" else "generate",
                "pixels": str(786_432 + i),
                "amount_micro": str(11_797 + i),
                "ts_ms": str(ms),
                "process_id": "proc_old",
            },
            id=f"{ms}-0",
        )


async def settle_some(meter: Meter, key_id: str, count: int, seed: int) -> None:
    rng = random.Random(seed)
    for i in range(count):
        model = MODELS[rng.randrange(3)]
        images = rng.randint(1, 4)
        pixels = sum(rng.choice([262_144, 786_432, 1_048_576]) for _ in range(images))
        hold = -(-pixels * 40_000 // 1_000_000)
        admission = await meter.admit(
            key_id=key_id,
            request_id=f"req_{seed:08x}{i:024x}",
            model=model,
            operation="upscale" if model == "topaz" else "generate",
            estimate=Price(amount=hold, pixels=pixels, unit_price=40_000),
            endpoint=model,
        )
        if rng.random() < 0.25:
            await meter.release(admission, "upstream_error")
            continue
        produced = [GeneratedImage("https://x/i.png", 512, 512, "image/png")] * images
        await meter.settle(
            admission,
            Price(amount=hold - rng.randint(0, 3), pixels=pixels, unit_price=40_000),
            produced,
        )


async def assert_rollups_match_the_raw_ledger(
    ledger: LedgerService, start: datetime | None = None, end: datetime | None = None
) -> None:
    raw = await ledger.recompute_usage(
        ExportQuery(
            start_ms=int(start.timestamp() * 1000) if start else None,
            end_ms=int(end.timestamp() * 1000) if end else None,
        )
    )
    for group_by in ("key", "model", "day"):
        expected = shape_report(raw, group_by=group_by, start=start, end=end)  # type: ignore[arg-type]
        got = await ledger.usage(key_id=None, start=start, end=end, group_by=group_by)  # type: ignore[arg-type]
        assert got == expected


async def test_rollups_equal_the_raw_ledger_before_and_after_archiving(
    ledger: LedgerService, r: Any
) -> None:
    for key_id in ("key_a", "key_b", "key_c"):
        await add_key(r, key_id)
    await pre_rollup_entries(r, "key_a", 40)  # written before rollups existed
    meters = [Meter(r, ledger.settings, f"proc_{n}") for n in range(2)]
    await asyncio.gather(
        settle_some(meters[0], "key_a", 30, 1),
        settle_some(meters[1], "key_a", 30, 2),  # concurrent settles on one key
        settle_some(meters[0], "key_b", 25, 3),
        settle_some(meters[1], "key_c", 25, 4),
    )
    # Backfill twice at once (and again later): older entries are counted exactly once.
    done = await asyncio.gather(ledger.backfill_rollups(), ledger.backfill_rollups())
    assert sum(done) == 3
    assert await ledger.backfill_rollups() == 0
    states = await ledger.rollups.states(["key_a", "key_b", "key_c"])
    assert all(s.backfilled for s in states.values())
    await assert_rollups_match_the_raw_ledger(ledger)

    report = await ledger.usage(key_id="key_a", start=None, end=None, group_by="day")
    assert len(report["rows"]) >= 3  # the old entries span several UTC days
    assert report["total"]["requests"] > 30
    assert report["total"]["images"] > 0

    # More traffic while part of the ledger is archived and trimmed away from Redis.
    drainer = Drainer(r, ledger.database, holder="t", retention_ms=0, batch_size=25)
    await drainer.drain()
    await settle_some(meters[0], "key_b", 10, 5)
    assert await r.xlen("{k:key_a}:ledger") == 0
    await assert_rollups_match_the_raw_ledger(ledger)

    # Windows with edges inside a day: whole days from rollups, the edges from the raw ledger.
    now = datetime.now(UTC)
    this_month = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    last_month = (this_month - timedelta(days=1)).replace(day=1)
    for start, end in [
        (now - timedelta(days=2, hours=5), now + timedelta(minutes=1)),
        (now - timedelta(days=1, hours=20), now - timedelta(days=1, hours=3)),
        (now.replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=2), None),
        (None, now - timedelta(hours=30)),
        (this_month - timedelta(days=40), this_month),  # ends with a whole calendar month
        (last_month, this_month),  # exactly one calendar month
    ]:
        await assert_rollups_match_the_raw_ledger(ledger, start, end)


async def test_a_key_not_yet_backfilled_is_reported_from_its_raw_ledger(
    ledger: LedgerService, r: Any
) -> None:
    await add_key(r, "key_old")
    await pre_rollup_entries(r, "key_old", 12)
    report = await ledger.usage(key_id="key_old", start=None, end=None, group_by="model")
    raw = await ledger.recompute_usage(ExportQuery(key_id="key_old"))
    assert report == shape_report(raw, group_by="model", start=None, end=None)
    assert report["total"]["requests"] == 9 and report["total"]["released"] == 3
