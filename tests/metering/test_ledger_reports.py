"""Usage reports (rollups) and ledger exports (archive + Redis tail) through the ledger
service, on the metering unit tests' real Redis and a SQLite archive."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from app.ledger.export import ExportQuery, decode_cursor
from app.ledger.service import LedgerService
from app.metering import Meter
from app.metering.reports import parse_moment
from app.settings import Settings


@pytest.fixture
async def ledger(r: Any, settings: Settings) -> Any:
    service = LedgerService.from_settings(r, settings)
    await service.migrate()
    yield service
    service.close()


async def usage_report(ledger: LedgerService, **kwargs: Any) -> dict[str, Any]:
    key_ids = kwargs.pop("key_ids", None)
    await ledger.backfill_rollups()
    return await ledger.usage(
        key_id=key_ids[0] if key_ids else None,
        start=kwargs.get("start"),
        end=kwargs.get("end"),
        group_by=kwargs.get("group_by", "key"),
    )


async def export(ledger: LedgerService, fmt: str = "jsonl", **kwargs: Any) -> str:
    chunks = await ledger.export(ExportQuery(**kwargs), fmt)  # type: ignore[arg-type]
    return b"".join([c async for c in chunks]).decode()


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


async def test_usage_grouped_by_key_and_model(
    meter: Meter, make_key: Any, price: Any, ledger: LedgerService
) -> None:
    await seed(meter, make_key, price)
    by_key = await usage_report(ledger, group_by="key")
    assert by_key["rows"] == [
        {
            "key": "key_a",
            "requests": 2,
            "released": 0,
            "images": 0,
            "amount_usd": "0.000300",
            "megapixels": "0.003",
        },
        {
            "key": "key_b",
            "requests": 1,
            "released": 1,
            "images": 0,
            "amount_usd": "0.001000",
            "megapixels": "0.01",
        },
    ]
    assert by_key["total"]["amount_usd"] == "0.001300"
    by_model = await usage_report(ledger, group_by="model", key_ids=["key_b"])
    assert by_model["rows"] == [
        {
            "model": "flux-dev",
            "requests": 1,
            "released": 1,
            "images": 0,
            "amount_usd": "0.001000",
            "megapixels": "0.01",
        }
    ]


async def test_usage_by_day_and_time_filters(
    meter: Meter, make_key: Any, price: Any, ledger: LedgerService
) -> None:
    await seed(meter, make_key, price)
    today = datetime.now(UTC).date()
    by_day = await usage_report(ledger, group_by="day")
    assert [row["day"] for row in by_day["rows"]] == [today.isoformat()]
    tomorrow = datetime.combine(today + timedelta(days=1), datetime.min.time(), UTC)
    assert (await usage_report(ledger, start=tomorrow))["rows"] == []
    assert (await usage_report(ledger, end=parse_moment(today.isoformat())))["rows"] == []
    whole_day = parse_moment(today.isoformat(), end=True)
    assert (await usage_report(ledger, end=whole_day))["total"]["requests"] == 3


async def test_exports_carry_every_entry_in_time_order(
    meter: Meter, make_key: Any, price: Any, ledger: LedgerService
) -> None:
    await seed(meter, make_key, price)
    lines = (await export(ledger)).splitlines()
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

    rows = list(csv.DictReader(io.StringIO(await export(ledger, "csv", key_id="key_b"))))
    assert [row["event"] for row in rows] == ["hold", "settle", "hold", "release"]
    assert sum(int(row["amount_micro"]) for row in rows if row["event"] == "settle") == 1_000


async def test_paging_through_a_long_ledger(
    meter: Meter, make_key: Any, price: Any, ledger: LedgerService
) -> None:
    await make_key("key_a")
    for i in range(25):
        await run(meter, "key_a", f"r{i}", "flux-dev", 2, price)
    entries: list[dict[str, Any]] = []
    while True:
        after = entries[-1]["cursor"] if entries else None
        page = (await export(ledger, after=after and decode_cursor(after), limit=7)).splitlines()
        if not page:
            break
        entries += [json.loads(line) for line in page]
    assert len(entries) == 50
    assert len({e["entry_id"] for e in entries}) == 50
