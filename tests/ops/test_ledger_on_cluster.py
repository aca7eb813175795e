"""The ledger at rest on a real 3-master Redis Cluster: rollups kept by the settle/release script
(its month hash shares the key's slot), the drainer's pipelines and trims fanned out over the
nodes, the export merging archive and tail, and the backfill."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis_topologies import RedisTopology

from app.catalog.pricing import Price
from app.ledger.export import ExportQuery, decode_cursor
from app.ledger.service import LedgerService, shape_report
from app.metering import Meter
from app.ops.redis_topology import redis_from_url
from app.settings import Settings
from app.upstream.types import GeneratedImage


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        data_dir=tmp_path,
        default_rpm=100_000,
        default_max_concurrent=10_000,
        ledger_redis_retention_h=0,
        ledger_drain_batch=7,
    )


@pytest.fixture
async def cluster(redis_cluster: RedisTopology, settings: Settings) -> AsyncIterator[Any]:
    client = redis_from_url(redis_cluster.url, settings)
    assert isinstance(client, aioredis.RedisCluster)
    yield client
    await client.aclose()


async def test_rollups_archive_and_export_on_a_cluster(cluster: Any, settings: Settings) -> None:
    ledger = LedgerService.from_settings(cluster, settings)
    await ledger.migrate()
    await cluster.delete("falgate:ledger:archive")  # this test's own archive
    meter = Meter(cluster, settings, "proc_cluster")
    key_ids = [f"key_{uuid.uuid4().hex[:10]}" for _ in range(6)]  # spread over the slots
    slots = {await cluster.cluster_keyslot(f"{{k:{k}}}:ledger") for k in key_ids}
    assert len(slots) > 1
    for n, key_id in enumerate(key_ids):
        await cluster.hset(f"{{k:{key_id}}}:meta", mapping={"id": key_id, "status": "active"})
        await cluster.sadd("falgate:keys", key_id)
        for i in range(4 + n):
            admission = await meter.admit(
                key_id=key_id,
                request_id=f"req_{uuid.uuid4().hex}",
                model="fal-ai/flux/dev",
                operation="generate",
                estimate=Price(amount=11_797, pixels=786_432, unit_price=15_000),
                endpoint="fal-ai/flux/dev",
            )
            if i % 3 == 2:
                await meter.release(admission, "upstream_error")
            else:
                image = GeneratedImage("https://x/a.jpg", 1024, 768, "image/jpeg")
                await meter.settle(
                    admission, Price(amount=11_797 - i, pixels=786_432, unit_price=15_000), [image]
                )
    assert await ledger.backfill_rollups() >= len(key_ids)

    query = ExportQuery()
    before = await ledger.recompute_usage(query)
    mine = {g: t for g, t in before.items() if g[0] in key_ids}
    report = await ledger.usage(key_id=None, start=None, end=None, group_by="key")
    rows = [r for r in report["rows"] if r["key"] in key_ids]
    expected = shape_report(mine, group_by="key", start=None, end=None)["rows"]
    assert rows == expected

    chunks = await ledger.export(query, "jsonl")
    exported_before = b"".join([c async for c in chunks]).decode().splitlines()

    drain = await ledger.drainer("proc_cluster").drain()
    assert drain.archived >= sum(2 * (4 + n) for n in range(6))
    for key_id in key_ids:  # window 0: everything archived is trimmed, on every node
        assert await cluster.xlen(f"{{k:{key_id}}}:ledger") == 0

    chunks = await ledger.export(query, "jsonl")
    exported_after = b"".join([c async for c in chunks]).decode().splitlines()
    assert exported_after == exported_before
    positions = [decode_cursor(json.loads(line)["cursor"]) for line in exported_after]
    assert positions == sorted(positions)
    report = await ledger.usage(key_id=None, start=None, end=None, group_by="key")
    assert [r for r in report["rows"] if r["key"] in key_ids] == expected
    ledger.close()
    await cluster.delete("falgate:ledger:archive")  # leave the cluster as it was
