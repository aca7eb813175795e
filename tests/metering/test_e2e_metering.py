"""End-to-end over HTTP: several ``falgate serve`` processes, one Redis, the sandbox as fal.

Budgets are exact under concurrency across processes, a SIGKILLed gateway's work is billed
from what the sandbox produced, idempotent replays charge once, and a Redis restart is a
503 and then business as usual.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import redis.asyncio as redis

from app.redis import EmbeddedRedis

# square: 512 x 512 px = 262_144 px at 0.015 USD/MP -> ceil(3932.16) micro-dollars
SQUARE_PIXELS = 262_144
SQUARE_COST = 3_933
BODY = {"prompt": "a lighthouse at dusk", "image_size": "square"}


def cost_of(pixels: int, unit_price: int = 15_000) -> int:
    return -(-pixels * unit_price // 1_000_000)


async def usage(gateway: Any, key: str) -> dict[str, Any]:
    async with gateway.client(key) as client:
        response = await client.get("/v1/usage")
    assert response.status_code == 200, response.text
    return dict(response.json())


async def settled_until_quiet(deployment: Any, gateway: Any, key: str) -> dict[str, Any]:
    """Wait (bounded) until nothing is held any more, i.e. every hold was resolved."""
    for _ in range(600):
        current = await usage(gateway, key)
        if current["held_usd"] == "0.000000" and current["in_flight"] == 0:
            return current
        await asyncio.sleep(0.1)
    raise AssertionError(f"holds never resolved: {current}")


async def test_budget_for_exactly_n_images_across_two_gateways(
    deployment: Any, pair: Any, fresh_sandbox: Any
) -> None:
    n = 7
    deployment.configure_sandbox(latency_ms=50)
    key_id, key = await deployment.create_key(
        pair[0], budget_usd=f"{n * SQUARE_COST / 1_000_000:.6f}", budget_period="total"
    )
    clients = [gw.client(key) for gw in pair]
    try:
        responses = await asyncio.gather(
            *(clients[i % 2].post("/v1/generate", json=BODY) for i in range(60))
        )
    finally:
        for client in clients:
            await client.aclose()

    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * n + [402] * (60 - n)
    refused = next(r for r in responses if r.status_code == 402).json()["error"]
    assert refused["type"] == "budget_exceeded"
    assert refused["estimate_usd"] == "0.003933"
    for ok in (r for r in responses if r.status_code == 200):
        assert ok.headers["X-Cost-USD"] == "0.003933"

    ledger = await deployment.ledger(pair[1], key_id)
    settles = [e for e in ledger if e["event"] == "settle"]
    assert len(settles) == n
    assert sum(e["amount_micro"] for e in settles) == n * SQUARE_COST
    assert sum(1 for e in ledger if e["event"] == "hold") == n  # refusals hold nothing
    final = await usage(pair[0], key)
    assert (final["spent_usd"], final["held_usd"], final["remaining_usd"]) == (
        f"{n * SQUARE_COST / 1_000_000:.6f}",
        "0.000000",
        "0.000000",
    )
    produced = [r for r in deployment.sandbox_requests() if r["status"] == "completed"]
    assert len(produced) == n


async def test_sigkilled_gateway_is_billed_for_what_fal_produced(
    deployment: Any, pair: Any, fresh_sandbox: Any
) -> None:
    deployment.configure_sandbox(latency_ms=1500)
    victim = deployment.start_gateway()
    key_id, key = await deployment.create_key(pair[0])
    sizes = [("square", 512, 512), ("landscape_4_3", 1024, 768), ("portrait_16_9", 576, 1024)]

    async def doomed(i: int) -> None:
        body = {"prompt": f"doomed {i}", "image_size": sizes[i % 3][0]}
        async with victim.client(key) as client:
            try:
                await client.post("/v1/generate", json=body)
            except httpx.HTTPError:
                pass  # the gateway died under us

    requests = [asyncio.create_task(doomed(i)) for i in range(6)]
    # Until fal has accepted all six jobs and the gateway has recorded fal's ids on the holds.
    # (Between fal accepting a submit and that write there is a window of a few milliseconds
    # in which a crash leaves the hold without fal's id; the sweeper then releases it.)
    store = redis.Redis.from_url(deployment.redis.url, decode_responses=True)
    try:
        for _ in range(600):
            holds = [json.loads(h) for h in (await store.hgetall(f"{{k:{key_id}}}:holds")).values()]
            if len(holds) == 6 and all(h["upstream"] for h in holds):
                break
            await asyncio.sleep(0.02)
    finally:
        await store.aclose()
    victim.kill()
    await asyncio.gather(*requests)

    await settled_until_quiet(deployment, pair[0], key)
    produced = {r["request_id"]: r for r in deployment.sandbox_requests()}
    assert all(r["status"] == "completed" for r in produced.values())
    ledger = await deployment.ledger(pair[0], key_id)
    settles = {e["upstream_request_id"]: e for e in ledger if e["event"] == "settle"}
    assert settles.keys() == produced.keys()
    for fal_id, job in produced.items():
        assert settles[fal_id]["amount_micro"] == cost_of(job["pixels"])
        assert settles[fal_id]["reason"] == "resolved"
    total = sum(cost_of(job["pixels"]) for job in produced.values())
    assert (await usage(pair[0], key))["spent_usd"] == f"{total / 1_000_000:.6f}"


async def test_idempotent_replays_charge_once(
    deployment: Any, pair: Any, fresh_sandbox: Any
) -> None:
    deployment.configure_sandbox(latency_ms=300)
    key_id, key = await deployment.create_key(pair[0])
    first_gw, second_gw = (gw.client(key) for gw in pair)
    try:
        # sequential
        headers = {"Idempotency-Key": "order-1"}
        first = await first_gw.post("/v1/generate", json=BODY, headers=headers)
        again = await second_gw.post("/v1/generate", json=BODY, headers=headers)
        assert first.status_code == again.status_code == 200
        assert again.json() == first.json()
        assert again.headers["Idempotent-Replayed"] == "true"
        assert again.headers["X-Cost-USD"] == "0.003933"
        other = await first_gw.post(
            "/v1/generate", json={**BODY, "prompt": "another"}, headers=headers
        )
        assert other.status_code == 409
        assert other.json()["error"]["type"] == "idempotency_conflict"

        # concurrent, over both processes
        headers = {"Idempotency-Key": "order-2"}
        together = await asyncio.gather(
            *((first_gw, second_gw)[i % 2].post("/v1/generate", json=BODY, headers=headers)
              for i in range(10))
        )  # fmt: skip
    finally:
        await first_gw.aclose()
        await second_gw.aclose()
    assert [r.status_code for r in together] == [200] * 10
    assert len({r.text for r in together}) == 1
    assert sum(1 for r in together if "Idempotent-Replayed" not in r.headers) == 1

    ledger = await deployment.ledger(pair[0], key_id)
    assert sum(1 for e in ledger if e["event"] == "settle") == 2
    assert len(deployment.sandbox_requests()) == 2  # fal saw each request once
    assert (await usage(pair[0], key))["spent_usd"] == f"{2 * SQUARE_COST / 1_000_000:.6f}"


async def test_redis_restart_is_503_then_recovers(
    deployment: Any, pair: Any, fresh_sandbox: Any
) -> None:
    key_id, key = await deployment.create_key(pair[0], budget_usd="1")
    clients = [gw.client(key) for gw in pair]
    try:
        for client in clients:
            assert (await client.post("/v1/generate", json=BODY)).status_code == 200

        old = deployment.redis
        old.stop()
        for client in clients:
            down = await client.post("/v1/generate", json=BODY)
            assert down.status_code == 503
            assert down.json()["error"]["type"] == "unavailable"
        assert len(deployment.sandbox_requests()) == 2  # nothing unmetered reached fal

        restarted = EmbeddedRedis(old.data_dir, port=old.port, persist=True)
        restarted.password = old.password
        restarted.start()
        deployment.redis = restarted

        for client in clients:
            for _ in range(200):
                back = await client.post("/v1/generate", json=BODY)
                if back.status_code != 503:
                    break
                await asyncio.sleep(0.05)
            assert back.status_code == 200, back.text
    finally:
        for client in clients:
            await client.aclose()

    final = await settled_until_quiet(deployment, pair[0], key)
    ledger = await deployment.ledger(pair[0], key_id)
    settled = sum(e["amount_micro"] for e in ledger if e["event"] == "settle")
    assert settled == 4 * SQUARE_COST
    assert final["spent_usd"] == f"{settled / 1_000_000:.6f}"
    produced = {r["request_id"]: r for r in deployment.sandbox_requests()}
    billed = {e["upstream_request_id"] for e in ledger if e["event"] == "settle"}
    assert billed == produced.keys(), (ledger, produced)


async def test_redis_blip_while_fal_works_is_still_billed(
    deployment: Any, pair: Any, fresh_sandbox: Any
) -> None:
    """Redis goes away after the hold and comes back before fal finishes: the request
    succeeds and is settled exactly (the settle retries through the outage)."""
    gateway = pair[0]
    key_id, key = await deployment.create_key(gateway, budget_usd="1")
    deployment.configure_sandbox(latency_ms=1500)
    async with gateway.client(key) as client:
        request = asyncio.ensure_future(client.post("/v1/generate", json=BODY))
        for _ in range(100):  # wait until fal has the job
            if deployment.sandbox_requests():
                break
            await asyncio.sleep(0.02)
        assert deployment.sandbox_requests()
        old = deployment.redis
        old.stop()
        await asyncio.sleep(0.5)
        restarted = EmbeddedRedis(old.data_dir, port=old.port, persist=True)
        restarted.password = old.password
        restarted.start()
        deployment.redis = restarted
        response = await request
    assert response.status_code == 200, response.text
    assert response.headers["x-cost-usd"] == f"0.{SQUARE_COST:06d}"
    final = await settled_until_quiet(deployment, gateway, key)
    assert final["spent_usd"] == f"0.{SQUARE_COST:06d}"
    ledger = await deployment.ledger(gateway, key_id)
    assert [e["event"] for e in ledger] == ["hold", "settle"]
