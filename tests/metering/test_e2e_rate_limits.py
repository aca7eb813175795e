"""Rate limits end to end over HTTP, across two gateway processes sharing one Redis.

(These live beside the metering end-to-end tests because they share that isolated deployment:
its own Redis, sandbox and ``falgate serve`` processes.)
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as redis

BODY = {"prompt": "a kite over the dunes", "image_size": "square"}


async def spread(pair: Any, key: str, n: int, body: dict[str, Any] = BODY) -> list[Any]:
    clients = [gw.client(key) for gw in pair]
    try:
        return list(
            await asyncio.gather(
                *(clients[i % 2].post("/v1/generate", json=body) for i in range(n))
            )
        )
    finally:
        for client in clients:
            await client.aclose()


async def test_requests_per_minute_exact_across_processes(
    deployment: Any, pair: Any, fresh_sandbox: Any
) -> None:
    _, key = await deployment.create_key(pair[0], rpm=10)
    responses = await spread(pair, key, 30)
    assert sorted(r.status_code for r in responses) == [200] * 10 + [429] * 20
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.json()["error"]["type"] == "rate_limited"
    assert refused.headers["RateLimit-Limit"] == "10"
    assert refused.headers["RateLimit-Remaining"] == "0"
    assert int(refused.headers["Retry-After"]) >= 1
    assert int(refused.headers["RateLimit-Reset"]) >= 1
    admitted = [r for r in responses if r.status_code == 200]
    assert all(r.headers["RateLimit-Limit"] == "10" for r in admitted)
    assert sorted(int(r.headers["RateLimit-Remaining"]) for r in admitted)[0] == 0


async def test_in_flight_limit_exact_across_processes(
    deployment: Any, pair: Any, fresh_sandbox: Any
) -> None:
    deployment.configure_sandbox(latency_ms=1000)
    key_id, key = await deployment.create_key(pair[0], max_concurrent=3)
    responses = await spread(pair, key, 12)
    assert sorted(r.status_code for r in responses) == [200] * 3 + [429] * 9
    refused = next(r for r in responses if r.status_code == 429)
    assert "in flight" in refused.json()["error"]["message"]
    assert refused.headers["Retry-After"] == "1"
    ledger = await deployment.ledger(pair[0], key_id)
    assert sum(1 for e in ledger if e["event"] == "hold") == 3


async def test_client_waiting_retry_after_then_succeeds(
    deployment: Any, pair: Any, fresh_sandbox: Any
) -> None:
    _, key = await deployment.create_key(pair[0], rpm=120)
    refused = None
    for _ in range(20):  # spend the burst until the first refusal
        batch = await spread(pair, key, 20)
        refused = next((r for r in batch if r.status_code == 429), None)
        if refused is not None:
            break
    assert refused is not None
    await asyncio.sleep(int(refused.headers["Retry-After"]))
    async with pair[1].client(key) as client:
        retried = await client.post("/v1/generate", json=BODY)
    assert retried.status_code == 200


async def test_flooding_key_does_not_starve_another_under_the_global_cap(
    deployment: Any, fresh_sandbox: Any
) -> None:
    deployment.configure_sandbox(latency_ms=400)
    capped = [deployment.start_gateway(FALGATE_UPSTREAM_MAX_CONCURRENT="2") for _ in range(2)]
    _, flood_key = await deployment.create_key(capped[0], name="flood")
    _, quiet_key = await deployment.create_key(capped[0], name="quiet")
    done: list[str] = []

    async def call(gateway: Any, key: str, label: str) -> int:
        async with gateway.client(key) as client:
            response = await client.post("/v1/generate", json=BODY)
        done.append(label)
        return response.status_code

    flood = [asyncio.create_task(call(capped[i % 2], flood_key, "flood")) for i in range(16)]
    store = redis.Redis.from_url(deployment.redis.url, decode_responses=True)
    try:
        for _ in range(600):  # until the flood is queued at the gate
            if await store.zcard("{falgate:gate}:waiters") >= 10:
                break
            await asyncio.sleep(0.02)
    finally:
        await store.aclose()
    before = len(done)
    quiet = await call(capped[1], quiet_key, "quiet")
    assert quiet == 200
    # The quiet key got the next free slot: of the flood's 14 queued requests, at most the two
    # that were running and the one started alongside it finished first, not the whole queue.
    assert done.index("quiet") - before <= 4
    assert await asyncio.gather(*flood) == [200] * 16
