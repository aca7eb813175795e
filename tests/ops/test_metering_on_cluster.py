"""Metering, rate limits, the upstream gate and the sweeper on a real 3-master Redis Cluster.

The same calls the gateway makes, through the client ``FALGATE_REDIS_URL=redis+cluster://...``
gives: every script touches one key's hash tag, so it runs on a cluster unchanged.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis_topologies import RedisTopology

from app.catalog.pricing import Price
from app.errors import BudgetExceeded, RateLimited, Unavailable
from app.metering import Meter
from app.metering.sweeper import Sweeper
from app.ops.holds import outstanding_holds
from app.ops.redis_topology import redis_from_url
from app.ratelimit.upstream_gate import UpstreamGate
from app.settings import Settings
from app.upstream.types import OutcomeState, UpstreamOutcome


@pytest.fixture
def settings() -> Settings:
    return Settings(
        _env_file=None,
        default_rpm=100_000,
        default_max_concurrent=10_000,
        upstream_max_concurrent=2,
        upstream_queue_timeout_s=0.3,
        process_lease_s=1,
    )


@pytest.fixture
async def cluster(redis_cluster: RedisTopology, settings: Settings) -> AsyncIterator[Any]:
    client = redis_from_url(redis_cluster.url, settings)
    assert isinstance(client, aioredis.RedisCluster)
    yield client
    await client.aclose()


async def make_key(client: Any, *, budget_micro: int | None = None, **limits: int) -> str:
    """A key record as the keys service writes it; returns its id (unique per test)."""
    key_id = f"key_{uuid.uuid4().hex[:10]}"
    await client.hset(
        f"{{k:{key_id}}}:meta",
        mapping={
            "id": key_id,
            "name": key_id,
            "status": "active",
            "created_at": str(int(time.time())),
            "expires_at": "",
            "budget_micro": "" if budget_micro is None else str(budget_micro),
            "budget_period": "total",
            "rpm": str(limits.get("rpm", "")),
            "max_concurrent": str(limits.get("max_concurrent", "")),
            "models": "",
        },
    )
    await client.sadd("falgate:keys", key_id)
    return key_id


def price(amount: int) -> Price:
    return Price(amount=amount, pixels=786_432, unit_price=15_000)


async def admit(meter: Meter, key_id: str, amount: int = 11_797) -> Any:
    try:
        return await meter.admit(
            key_id=key_id,
            request_id=f"req_{uuid.uuid4().hex}",
            model="fal-ai/flux/dev",
            operation="generate",
            estimate=price(amount),
            endpoint="fal-ai/flux/dev",
        )
    except (BudgetExceeded, RateLimited) as exc:
        return exc


async def test_hold_settle_and_usage(cluster: Any, settings: Settings) -> None:
    meter = Meter(cluster, settings, "proc_cluster")
    key_id = await make_key(cluster, budget_micro=50_000)
    admission = await admit(meter, key_id)
    assert admission.remaining == 50_000 - 11_797
    settlement = await meter.settle(admission, price(10_000))
    assert (settlement.charged, settlement.released) == (10_000, 1_797)
    usage = await meter.usage(key_id)
    assert (usage["spent_usd"], usage["held_usd"], usage["remaining_usd"]) == (
        "0.010000",
        "0.000000",
        "0.040000",
    )
    entries = await cluster.xrange(f"{{k:{key_id}}}:ledger")
    assert len(entries) == 2  # hold, settle


async def test_concurrent_holds_never_exceed_the_budget(cluster: Any, settings: Settings) -> None:
    meter = Meter(cluster, settings, "proc_cluster")
    key_id = await make_key(cluster, budget_micro=50_000)
    results = await asyncio.gather(*(admit(meter, key_id) for _ in range(20)))
    admitted = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, BudgetExceeded)]
    assert (len(admitted), len(refused)) == (4, 16)  # 4 x 11797 <= 50000 < 5 x 11797
    for admission in admitted:
        await meter.release(admission, "test")
    assert (await meter.usage(key_id))["remaining_usd"] == "0.050000"


async def test_rate_limits(cluster: Any, settings: Settings) -> None:
    meter = Meter(cluster, settings, "proc_cluster")
    rpm_key = await make_key(cluster, rpm=5)
    results = [await admit(meter, rpm_key, 1) for _ in range(8)]
    limited = [r for r in results if isinstance(r, RateLimited)]
    assert len(limited) == 3
    assert limited[0].headers["RateLimit-Limit"] == "5"
    assert int(limited[0].headers["Retry-After"]) >= 1

    busy_key = await make_key(cluster, max_concurrent=2)
    first, second, third = [await admit(meter, busy_key, 1) for _ in range(3)]
    assert isinstance(third, RateLimited)
    await meter.settle(first, price(1))
    assert not isinstance(await admit(meter, busy_key, 1), Exception)
    await meter.release(second, "test")


async def test_upstream_gate_caps_concurrency(cluster: Any, settings: Settings) -> None:
    gate = UpstreamGate(cluster, settings, "proc_cluster")
    await gate.acquire("key_a", "r1")
    await gate.acquire("key_b", "r2")
    assert (await gate.stats()).in_use == 2
    with pytest.raises(Unavailable):
        await gate.acquire("key_c", "r3")  # full until the queue timeout
    await gate.release("r1")
    await gate.acquire("key_c", "r3")
    for rid in ("r2", "r3"):
        await gate.release(rid)
    assert (await gate.stats()).in_use == 0


class NothingAtFal:
    async def outcome(self, endpoint: str, request_id: str) -> UpstreamOutcome:
        return UpstreamOutcome(OutcomeState.UNKNOWN)


async def test_sweeper_releases_a_dead_processs_holds(cluster: Any, settings: Settings) -> None:
    # A process that placed a hold a minute ago and has no lease: it crashed.
    dead = Meter(cluster, settings, "proc_dead", clock=lambda: time.time() - 60)
    key_id = await make_key(cluster, budget_micro=50_000)
    orphan = await admit(dead, key_id)
    sweeper = Sweeper(cluster, settings, "proc_sweeper", NothingAtFal())
    await sweeper.heartbeat()
    report = await sweeper.sweep_once()
    assert orphan.request_id in report.released
    usage = await Meter(cluster, settings, "proc_sweeper").usage(key_id)
    assert (usage["held_usd"], usage["in_flight"]) == ("0.000000", 0)


async def test_outstanding_holds_are_counted_across_the_cluster(
    cluster: Any, settings: Settings
) -> None:
    meter = Meter(cluster, settings, "proc_cluster")
    before = await outstanding_holds(cluster)
    keys = [await make_key(cluster) for _ in range(3)]
    admissions = [await admit(meter, key_id) for key_id in keys]
    after = await outstanding_holds(cluster)
    assert (after.count - before.count, after.micro - before.micro) == (3, 3 * 11_797)
    for admission in admissions:
        await meter.release(admission, "test")
    assert await outstanding_holds(cluster) == before
