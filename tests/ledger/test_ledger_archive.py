"""The drainer moves the ledger into SQL exactly once and trims only what is archived and old;
the export merges archive and Redis tail in order, across pages. Every test runs on SQLite and
on a real PostgreSQL server."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from app.catalog.pricing import Price
from app.errors import InvalidRequest
from app.ledger.database import LedgerDatabase, Progress
from app.ledger.drainer import Drainer
from app.ledger.export import ExportQuery, decode_cursor
from app.ledger.service import LedgerService
from app.metering import Meter
from app.redis import EmbeddedRedis
from app.settings import Settings

ROOT = Path(__file__).resolve().parent.parent.parent
HOUR_MS = 3_600_000


async def add_key(r: Any, key_id: str) -> None:
    await r.hset(f"{{k:{key_id}}}:meta", mapping={"id": key_id, "status": "active"})
    await r.sadd("falgate:keys", key_id)


async def xadd_many(r: Any, key_id: str, count: int, *, first_ms: int | None = None) -> list[str]:
    """``count`` settle entries appended to the key's stream (ids from ``first_ms`` on, one a
    millisecond, when given); returns their ids."""
    async with r.pipeline(transaction=False) as pipe:
        for i in range(count):
            entry_id = "*" if first_ms is None else f"{first_ms + i}-0"
            pipe.xadd(
                f"{{k:{key_id}}}:ledger",
                {
                    "event": "settle",
                    "key_id": key_id,
                    "request_id": f"req_{key_id}_{i}",
                    "upstream_request_id": "",
                    "model": "fal-ai/flux/dev",
                    "operation": "generate",
                    "pixels": str(1000 + i),
                    "amount_micro": str(10 + i),
                    "released_micro": "0",
                    "hold_micro": str(10 + i),
                    "reason": "completed",
                    "ts_ms": str(first_ms + i) if first_ms else str(int(time.time() * 1000)),
                    "process_id": "proc_test",
                },
                id=entry_id,
            )
        return [str(i) for i in await pipe.execute()]


def drainer_for(ledger: LedgerService, *, retention_ms: int, batch: int = 50) -> Drainer:
    return Drainer(
        ledger.redis, ledger.database, holder="test", retention_ms=retention_ms, batch_size=batch
    )


async def stream_ids(r: Any, key_id: str) -> list[str]:
    return [str(i) for i, _ in await r.xrange(f"{{k:{key_id}}}:ledger")]


def archived(database: LedgerDatabase) -> list[tuple[str, str]]:
    rows = database.page(after=None, key_id=None, start_ms=None, end_ms=None, limit=10**7)
    return [(row[1], row[3]) for row in rows]


async def test_drain_archives_every_entry_once_and_keeps_the_recent_window(
    ledger: LedgerService, r: Any, price: Any
) -> None:
    now_ms = int(time.time() * 1000)
    await add_key(r, "key_a")
    await add_key(r, "key_b")
    old = await xadd_many(r, "key_a", 30, first_ms=now_ms - 3 * HOUR_MS)  # older than 1 h
    meter = Meter(r, ledger.settings, "proc_test")
    for i in range(5):  # real money-path entries (hold + settle), recent
        admission = await meter.admit(
            key_id="key_b",
            request_id=f"r{i}",
            model="fal-ai/flux/dev",
            operation="generate",
            estimate=price(11_797),
            endpoint="fal-ai/flux/dev",
        )
        await meter.settle(admission, price(11_000))
    recent_a = await xadd_many(r, "key_a", 7)
    everything = {("key_a", i) for i in old + recent_a} | {
        ("key_b", i) for i in await stream_ids(r, "key_b")
    }

    report = await drainer_for(ledger, retention_ms=HOUR_MS).drain()
    assert report.archived == len(everything) == 30 + 7 + 10
    assert sorted(archived(ledger.database)) == sorted(everything)
    # Archived AND older than the window: gone from Redis; the recent ones stay.
    assert await stream_ids(r, "key_a") == recent_a
    assert len(await stream_ids(r, "key_b")) == 10
    assert report.trimmed == 30

    # Draining again offers nothing new; nothing is archived twice.
    again = await drainer_for(ledger, retention_ms=HOUR_MS).drain()
    assert again.archived == 0
    assert ledger.database.count() == len(everything)
    progress = ledger.database.progress()
    assert progress["key_a"].entry_id == recent_a[-1]

    rows = {
        row[3]: row
        for row in ledger.database.page(
            after=None, key_id="key_b", start_ms=None, end_ms=None, limit=100
        )
    }
    settles = [row for row in rows.values() if row[4] == "settle"]
    assert [row[10] for row in settles] == [11_000] * 5  # amount_micro
    assert [row[11] for row in settles] == [797] * 5  # released_micro
    assert [row[12] for row in settles] == [11_797] * 5  # hold_micro


async def test_trimming_never_drops_an_unarchived_entry(ledger: LedgerService, r: Any) -> None:
    await add_key(r, "key_a")
    ids = await xadd_many(r, "key_a", 10, first_ms=1_000_000)  # all far older than any window
    # Archive only the first four (as a drain that stopped there would have).
    entries = [(i, f) for i, f in await r.xrange("{k:key_a}:ledger", count=4)]
    ledger.database.archive({"key_a": entries})
    drainer = drainer_for(ledger, retention_ms=0)
    progress = ledger.database.progress()
    assert progress == {"key_a": Progress(1_000_003, 0)}

    assert await drainer.trim(progress) == 4
    assert await stream_ids(r, "key_a") == ids[4:]
    # A trim from a stale (older) progress snapshot trims nothing more.
    assert await drainer.trim({"key_a": Progress(1_000_001, 0)}) == 0
    # A key the archive has never seen is not trimmed at all.
    await add_key(r, "key_new")
    new_ids = await xadd_many(r, "key_new", 3, first_ms=1_000)
    assert await drainer.trim(ledger.database.progress()) == 0
    assert await stream_ids(r, "key_new") == new_ids


async def test_a_drainer_killed_mid_batch_leaves_the_archive_exact(
    ledger: LedgerService,
    r: Any,
    private_redis_server: EmbeddedRedis,
    ledger_settings: Settings,
    tmp_path: Path,
) -> None:
    expected: set[tuple[str, str]] = set()
    for n in range(4):
        key_id = f"key_{n}"
        await add_key(r, key_id)
        for _ in range(5):
            expected |= {(key_id, i) for i in await xadd_many(r, key_id, 1000)}
    env = {
        **os.environ,
        "FALGATE_REDIS_URL": private_redis_server.url,
        "FALGATE_DATA_DIR": str(tmp_path),
        "FALGATE_LEDGER_DATABASE_URL": str(ledger_settings.ledger_database_url),
        "FALGATE_LEDGER_DRAIN_BATCH": "300",
        "FALGATE_LEDGER_DRAIN_LEASE_S": "1",
        # Trim as soon as archived: a kill between insert and trim must lose nothing either.
        "FALGATE_LEDGER_REDIS_RETENTION_H": "0",
    }
    command = [sys.executable, "-m", "app.cli", "ledger", "drain", "--wait", "20"]
    kills = await asyncio.to_thread(drain_with_kills, command, env, ledger.database, 3)
    assert kills == 3
    stored = archived(ledger.database)
    assert len(stored) == len(set(stored)) == len(expected)  # no duplicate, no gap
    assert set(stored) == expected
    for n in range(4):
        assert await stream_ids(r, f"key_{n}") == []  # all archived, window 0: all trimmed


def drain_with_kills(
    command: list[str], env: dict[str, str], database: LedgerDatabase, kills_wanted: int
) -> int:
    """Run ``falgate ledger drain``, SIGKILL it as soon as it has committed another batch
    (mid-drain), ``kills_wanted`` times; then let a last run finish. Returns the kills."""
    kills = 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        before = database.count()
        proc = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        if kills < kills_wanted:
            while proc.poll() is None and database.count() <= before:
                time.sleep(0.01)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                continue
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out.decode()
        return kills
    raise AssertionError("the drain did not finish in time")


async def export_all(ledger: LedgerService, query: ExportQuery, fmt: str = "jsonl") -> str:
    chunks = await ledger.export(query, fmt)  # type: ignore[arg-type]
    return b"".join([c async for c in chunks]).decode()


async def test_export_of_archive_plus_tail_is_the_whole_ledger_in_order_across_pages(
    ledger: LedgerService, r: Any
) -> None:
    now_ms = int(time.time() * 1000)
    for key_id in ("key_b", "key_a", "key_c"):
        await add_key(r, key_id)
        await xadd_many(r, key_id, 20, first_ms=now_ms - 2 * HOUR_MS)  # same ms across keys
    # Archive and trim those (window 1 h): they now live only in SQL.
    await drainer_for(ledger, retention_ms=HOUR_MS, batch=7).drain()
    assert await stream_ids(r, "key_a") == []
    # Archived, still in Redis (recent), and never archived: the tail.
    for key_id in ("key_a", "key_c"):
        await xadd_many(r, key_id, 9)
    await drainer_for(ledger, retention_ms=HOUR_MS).drain()
    for key_id in ("key_a", "key_b"):
        await xadd_many(r, key_id, 11)

    everything: list[tuple[int, str, int]] = []
    for key_id in ("key_a", "key_b", "key_c"):
        sql = ledger.database.page(
            after=None, key_id=key_id, start_ms=None, end_ms=None, limit=1000
        )
        ids = {row[3] for row in sql} | set(await stream_ids(r, key_id))
        everything += [(int(i.split("-")[0]), key_id, int(i.split("-")[1])) for i in ids]
    everything.sort()
    assert len(everything) == 3 * 20 + 2 * 9 + 2 * 11

    whole = [json.loads(line) for line in (await export_all(ledger, ExportQuery())).splitlines()]
    assert [decode_cursor(e["cursor"]) for e in whole] == everything

    pages: list[dict[str, Any]] = []
    after = None
    while True:
        text = await export_all(ledger, ExportQuery(after=after, limit=13))
        page = [json.loads(line) for line in text.splitlines()]
        if not page:
            break
        assert len(page) <= 13
        pages += page
        after = decode_cursor(page[-1]["cursor"])
    assert pages == whole

    only_a = [decode_cursor(e["cursor"]) for e in whole if e["key_id"] == "key_a"]
    text = await export_all(ledger, ExportQuery(key_id="key_a", after=only_a[25]), "csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [decode_cursor(row["cursor"]) for row in rows] == only_a[26:]
    assert {row["event"] for row in rows} == {"settle"}

    window = ExportQuery(start_ms=everything[10][0], end_ms=now_ms - HOUR_MS)
    inside = [json.loads(line) for line in (await export_all(ledger, window)).splitlines()]
    assert [decode_cursor(e["cursor"]) for e in inside] == [
        p for p in everything if everything[10][0] <= p[0] < now_ms - HOUR_MS
    ]


def test_a_cursor_that_was_not_issued_is_a_bad_request() -> None:
    for bad in ("", "%%%", "bm90IGEgY3Vyc29y", "MTIz"):
        with pytest.raises(InvalidRequest):
            decode_cursor(bad)


@pytest.fixture
def price() -> Any:
    return lambda amount: Price(amount=amount, pixels=786_432, unit_price=15_000)


def run_cli(env: dict[str, str], *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", *args], cwd=ROOT, env=env, capture_output=True
    )
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


async def test_the_command_line_drains_exports_and_reports(
    ledger: LedgerService,
    r: Any,
    private_redis_server: EmbeddedRedis,
    ledger_settings: Settings,
    tmp_path: Path,
) -> None:
    await add_key(r, "key_a")
    ids = await xadd_many(r, "key_a", 12)
    env = {
        **os.environ,
        "FALGATE_REDIS_URL": private_redis_server.url,
        "FALGATE_DATA_DIR": str(tmp_path),
        "FALGATE_LEDGER_DATABASE_URL": str(ledger_settings.ledger_database_url),
    }
    drained = await asyncio.to_thread(run_cli, env, "ledger", "drain")
    assert json.loads(drained)["archived"] == 12
    await xadd_many(r, "key_a", 3)  # a tail after the archive
    text = await asyncio.to_thread(run_cli, env, "usage", "--ledger", "csv", "--limit", "5")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [row["entry_id"] for row in rows] == ids[:5]
    text = await asyncio.to_thread(
        run_cli, env, "usage", "--ledger", "jsonl", "--after", rows[-1]["cursor"]
    )
    assert [json.loads(line)["entry_id"] for line in text.splitlines()][:7] == ids[5:]
    assert len(text.splitlines()) == 10
    report = json.loads(await asyncio.to_thread(run_cli, env, "usage", "--group-by", "model"))
    assert report["rows"][0]["model"] == "fal-ai/flux/dev"
    # The drain backfilled the 12 entries written before rollups; the 3 written later without
    # the settle script (which keeps rollups) are not in them.
    assert report["total"]["requests"] == 12
    assert report["total"]["amount_usd"] == "0.000186"  # 10 + 11 + ... + 21 micro-dollars
