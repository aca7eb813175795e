"""Usage reports and ledger exports built from the ledger streams."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta
from typing import Any

from app.metering import Meter
from app.metering.reports import (
    export_csv,
    export_jsonl,
    iter_ledger,
    parse_moment,
    usage_report,
)


async def run(meter: Meter, key_id: str, rid: str, model: str, amount: int, price: Any) -> None:
    admission = await meter.admit(
        key_id=key_id,
        request_id=rid,
        model=model,
        operation="generate",
        estimate=price(amount, pixels=amount * 10),
        endpoint=model,
    )
    if amount % 2:
        await meter.release(admission, "upstream_error")
    else:
        await meter.settle(admission, price(amount, pixels=amount * 10))


async def seed(meter: Meter, make_key: Any, price: Any) -> None:
    await make_key("key_a")
    await make_key("key_b")
    await run(meter, "key_a", "r1", "flux-dev", 100, price)
    await run(meter, "key_a", "r2", "flux-pro", 200, price)
    await run(meter, "key_b", "r3", "flux-dev", 1_000, price)
    await run(meter, "key_b", "r4", "flux-dev", 7, price)  # released


async def collect(chunks: Any) -> str:
    return "".join([c async for c in chunks])


async def test_usage_grouped_by_key_and_model(
    meter: Meter, make_key: Any, price: Any, r: Any
) -> None:
    await seed(meter, make_key, price)
    by_key = await usage_report(r, group_by="key")
    assert by_key["rows"] == [
        {
            "key": "key_a",
            "requests": 2,
            "released": 0,
            "amount_usd": "0.000300",
            "megapixels": "0.003",
        },
        {
            "key": "key_b",
            "requests": 1,
            "released": 1,
            "amount_usd": "0.001000",
            "megapixels": "0.01",
        },
    ]
    assert by_key["total"]["amount_usd"] == "0.001300"
    by_model = await usage_report(r, group_by="model", key_ids=["key_b"])
    assert by_model["rows"] == [
        {
            "model": "flux-dev",
            "requests": 1,
            "released": 1,
            "amount_usd": "0.001000",
            "megapixels": "0.01",
        }
    ]


async def test_usage_by_day_and_time_filters(
    meter: Meter, make_key: Any, price: Any, r: Any
) -> None:
    await seed(meter, make_key, price)
    today = datetime.now(UTC).date()
    by_day = await usage_report(r, group_by="day")
    assert [row["day"] for row in by_day["rows"]] == [today.isoformat()]
    tomorrow = datetime.combine(today + timedelta(days=1), datetime.min.time(), UTC)
    assert (await usage_report(r, start=tomorrow))["rows"] == []
    assert (await usage_report(r, end=parse_moment(today.isoformat())))["rows"] == []
    whole_day = parse_moment(today.isoformat(), end=True)
    assert (await usage_report(r, end=whole_day))["total"]["requests"] == 3


async def test_exports_carry_every_entry_in_time_order(
    meter: Meter, make_key: Any, price: Any, r: Any
) -> None:
    await seed(meter, make_key, price)
    lines = (await collect(export_jsonl(iter_ledger(r)))).splitlines()
    entries = [json.loads(line) for line in lines]
    pairs = [(e["request_id"], e["event"]) for e in entries]
    assert sorted(pairs) == [
        ("r1", "hold"), ("r1", "settle"), ("r2", "hold"), ("r2", "settle"),
        ("r3", "hold"), ("r3", "settle"), ("r4", "hold"), ("r4", "release"),
    ]  # fmt: skip
    assert [e["timestamp"] for e in entries] == sorted(e["timestamp"] for e in entries)
    for rid in ("r1", "r2", "r3", "r4"):
        assert next(p for p in pairs if p[0] == rid)[1] == "hold"
    entries = [e for e in entries if e["request_id"] == "r1"]
    assert entries[1]["amount_usd"] == "0.000100"
    assert entries[1]["megapixels"] == "0.001"

    rows = list(
        csv.DictReader(io.StringIO(await collect(export_csv(iter_ledger(r, key_ids=["key_b"])))))
    )
    assert [row["event"] for row in rows] == ["hold", "settle", "hold", "release"]
    assert sum(int(row["amount_micro"]) for row in rows if row["event"] == "settle") == 1_000


async def test_paging_through_a_long_ledger(
    meter: Meter, make_key: Any, price: Any, r: Any
) -> None:
    await make_key("key_a")
    for i in range(25):
        await run(meter, "key_a", f"r{i}", "flux-dev", 2, price)
    entries = [e async for e in iter_ledger(r, page_size=7)]
    assert len(entries) == 50
    assert len({e.entry_id for e in entries}) == 50
