"""Two real gateway processes share one Redis and one archive database (SQLite or a real
PostgreSQL): after a concurrent load, the background drainer has archived every entry once,
``/admin/ledger`` pages through archive + tail in order, and ``/admin/usage`` equals a
recomputation from the raw ledger to the micro-dollar."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import random
from collections import defaultdict
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import create_engine, func, select

from app.ledger.drainer import ARCHIVE_KEY, LEASE_KEY
from app.ledger.schema import ledger_entries
from app.money import format_usd
from tests.metering.conftest import Deployment, GatewayProcess, client_for
from tests.metering.conftest import deployment as deployment  # the isolated deployment

SIZES = ["square", "landscape_4_3", "portrait_16_9", "square_hd"]
MODELS = ["fal-ai/flux/dev", "fal-ai/flux/schnell", "fal-ai/flux-pro"]


def archived_count(url: str, key_ids: list[str]) -> int:
    engine = create_engine(url)
    query = select(func.count()).select_from(ledger_entries)
    try:
        with engine.connect() as conn:
            return int(conn.execute(query.where(ledger_entries.c.key_id.in_(key_ids))).scalar_one())
    finally:
        engine.dispose()


async def raw_ledger(deployment: Deployment, key_ids: list[str]) -> list[tuple[int, str, int]]:
    """Every entry of the keys straight from the Redis streams, in export order."""
    client = client_for(deployment.redis.url, _settings())
    try:
        positions = []
        for key_id in key_ids:
            for entry_id, _ in await client.xrange(f"{{k:{key_id}}}:ledger"):
                ms, seq = str(entry_id).split("-")
                positions.append((int(ms), key_id, int(seq)))
        return sorted(positions)
    finally:
        await client.aclose()


def _settings() -> Any:
    from app.settings import Settings

    return Settings(_env_file=None)  # type: ignore[call-arg]


async def load(gateways: list[GatewayProcess], keys: list[str], requests: int) -> None:
    rng = random.Random(12)
    clients = [gw.client() for gw in gateways]
    concurrency = asyncio.Semaphore(24)  # concurrent, yet within a loaded 2-core machine
    try:

        async def one(i: int) -> None:
            key = keys[i % len(keys)]
            body = {
                "prompt": f"ledger load {i}",
                "model": MODELS[rng.randrange(len(MODELS))],
                "image_size": SIZES[rng.randrange(len(SIZES))],
                "num_images": rng.randint(1, 3),
            }
            client = clients[i % len(clients)]
            async with concurrency:
                response = await client.post(
                    "/v1/generate", json=body, headers={"Authorization": f"Bearer {key}"}
                )
            assert response.status_code in (200, 400), response.text

        await asyncio.gather(*(one(i) for i in range(requests)))
    finally:
        for client in clients:
            await client.aclose()


async def get_lines(client: Any, **params: Any) -> list[dict[str, Any]]:
    response = await client.get("/admin/ledger", params=params)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/x-ndjson"
    return [json.loads(line) for line in response.text.splitlines()]


def recompute(entries: list[dict[str, Any]], group_by: str) -> dict[str, dict[str, Any]]:
    groups: dict[str, dict[str, int]] = defaultdict(
        lambda: {"requests": 0, "released": 0, "images": 0, "micro": 0, "pixels": 0}
    )
    for e in entries:
        if e["event"] not in ("settle", "release"):
            continue
        day = datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).astimezone(UTC)
        name = {"key": e["key_id"], "model": e["model"], "day": day.date().isoformat()}[group_by]
        g = groups[name]
        if e["event"] == "settle":
            g["requests"] += 1
            g["images"] += e["images"]
            g["micro"] += e["amount_micro"]
            g["pixels"] += int(Decimal(e["megapixels"]) * 1_000_000)
        else:
            g["released"] += 1
    return {
        name: {
            "requests": g["requests"],
            "released": g["released"],
            "images": g["images"],
            "amount_usd": format_usd(g["micro"]),
            "megapixels": str(Decimal(g["pixels"]) / 1_000_000),
        }
        for name, g in groups.items()
    }


@pytest.fixture
async def pair(
    deployment: Deployment, ledger_url: str
) -> Any:  # two gateways on one archive, drained in the background
    client = client_for(deployment.redis.url, _settings())
    await client.delete(ARCHIVE_KEY, LEASE_KEY)  # a fresh archive database for this run
    await client.aclose()
    deployment.reset_sandbox()
    deployment.configure_sandbox(
        latency_ms=5,
        faults=[{"kind": "error", "status_code": 422, "endpoint": "fal-ai/flux/schnell"}],
    )
    env = {
        "FALGATE_LEDGER_DATABASE_URL": ledger_url,
        "FALGATE_LEDGER_DRAIN_INTERVAL_S": "0.2",
        "FALGATE_LEDGER_DRAIN_BATCH": "40",
        "FALGATE_LEDGER_DRAIN_LEASE_S": "2",
        "FALGATE_REDIS_SOCKET_TIMEOUT_S": "2",
        "FALGATE_METRICS_KEY_LABEL": "true",
    }
    gateways = [deployment.start_gateway(**env), deployment.start_gateway(**env)]
    yield gateways
    for gateway in gateways:
        gateway.kill()
    deployment.reset_sandbox()


async def test_two_gateways_archive_export_and_report_the_exact_ledger(
    deployment: Deployment, pair: list[GatewayProcess], ledger_url: str
) -> None:
    keys = []
    ids = []
    for n in range(3):
        key_id, key = await deployment.create_key(pair[n % 2], name=f"ledger-{n}")
        keys.append(key)
        ids.append(key_id)
    await load(pair, keys, 90)

    expected = await raw_ledger(deployment, ids)
    assert len(expected) >= 180  # a hold and its settle/release per request
    from app.ledger.database import database_url

    url = database_url(ledger_url, deployment.tmp)
    for _ in range(300):  # the background drainer catches up (one of the two holds the lease)
        if archived_count(url, ids) >= len(expected):
            break
        await asyncio.sleep(0.1)
    assert archived_count(url, ids) == len(expected)  # every entry once, no duplicate
    client = client_for(deployment.redis.url, _settings())
    try:  # the drainer's cycle also marks new keys' rollups complete (nothing to backfill)
        for _ in range(100):
            flags = [await client.hget(f"{{k:{k}}}:rollup", "backfilled") for k in ids]
            if flags == ["1"] * 3:
                break
            await asyncio.sleep(0.1)
        assert flags == ["1"] * 3  # so /admin/usage below answers from the rollups
    finally:
        await client.aclose()

    async with deployment.admin(pair[1]) as admin:
        whole = [e for e in await get_lines(admin) if e["key_id"] in ids]
        mine = [
            (int(e["entry_id"].split("-")[0]), e["key_id"], int(e["entry_id"].split("-")[1]))
            for e in whole
        ]
        assert mine == expected

        paged: list[dict[str, Any]] = []
        params: dict[str, Any] = {"limit": 37, "key_id": ids[0]}
        while True:
            page = await get_lines(admin, **params)
            if not page:
                break
            paged += page
            params["after"] = page[-1]["cursor"]
        assert paged == [e for e in whole if e["key_id"] == ids[0]]

        response = await admin.get("/admin/ledger", params={"format": "csv", "key_id": ids[1]})
        assert response.headers["content-type"].startswith("text/csv")
        rows = list(csv.DictReader(io.StringIO(response.text)))
        assert [row["entry_id"] for row in rows] == [
            e["entry_id"] for e in whole if e["key_id"] == ids[1]
        ]

        for group_by in ("key", "model", "day"):
            for key_id in [None, ids[2]]:
                params = {"group_by": group_by}
                entries = whole
                if key_id:
                    params["key_id"] = key_id
                    entries = [e for e in whole if e["key_id"] == key_id]
                response = await admin.get("/admin/usage", params=params)
                assert response.status_code == 200, response.text
                report = response.json()
                if key_id is None:
                    report["rows"] = [r for r in report["rows"] if r.get("key", ids[0]) in ids]
                got = {row.pop(group_by): row for row in report["rows"]}
                if key_id is None and group_by != "key":
                    continue  # other tests' keys share the model and day groups
                assert got == recompute(entries, group_by)

        # Spend by key on /metrics (opt-in), summed over both processes, is the settled total.
        by_key = recompute(whole, "key")
        for key_id in ids:
            scraped = 0
            for gateway in pair:
                async with gateway.client() as plain:
                    text = (await plain.get("/metrics")).text
                scraped += sum(
                    int(float(line.rsplit(" ", 1)[1]))
                    for line in text.splitlines()
                    if line.startswith(f'falgate_key_settled_micro_usd_total{{key="{key_id}"}}')
                )
            assert format_usd(scraped) == by_key[key_id]["amount_usd"]
            assert "falgate_holds_outstanding 0.0" in text

        for bad in ({"after": "not-a-cursor"}, {"limit": "0"}, {"format": "xml"}):
            response = await admin.get("/admin/ledger", params=bad)
            assert response.status_code == 400, response.text
            assert response.json()["error"]["type"] == "invalid_request"


def test_the_gateway_meters_while_the_archive_database_is_down(gateways: Any) -> None:
    gateway = gateways.start(FALGATE_LEDGER_DATABASE_URL="postgresql://falgate@127.0.0.1:1/none")
    try:
        _, key = gateway.create_key(name="no-archive")
        with gateway.client(key) as client:
            response = client.post("/v1/generate", json={"prompt": "x", "image_size": "square"})
            assert response.status_code == 200, response.text
        with gateway.admin() as admin:
            response = admin.get("/admin/ledger")
            assert response.status_code == 503, response.text
            assert response.json()["error"]["type"] == "unavailable"
        assert "Traceback" not in response.text
    finally:
        gateway.stop()
