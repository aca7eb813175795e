"""Chaos for the money path (SPEC section 10): every scenario ends with the money invariant.

After each one: Σ settled on the key's ledger equals Σ over the images the sandbox actually
produced of (w x h x unit price), rounded up once per request, to the micro-dollar; nothing is
held and nothing in flight within 20 s of going idle; and the key's whole remaining budget is
usable (no false 402 or 429). Everything is real: Redis (paused with SIGSTOP, killed with -9),
the sandbox over HTTP, and ``falgate serve`` processes (killed with -9).
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from tests.metering.conftest import Deployment, GatewayProcess
from tests.money import cost_of, micro

# One square (512x512) flux-dev image.
SQUARE = {"prompt": "chaos", "image_size": "square"}
SQUARE_COST = cost_of(512 * 512)
# The production default hold lease: a crashed process's holds must be resolved within it
# plus one sweep. Keys are cached (and invalidated over pub/sub) as in production, so that a
# Redis stall hits admission rather than authentication.
DEFAULT_LEASE = {"FALGATE_HOLD_LEASE_S": "15", "FALGATE_AUTH_CACHE_TTL_S": "60"}


@pytest.fixture(scope="module")
def gateway(deployment: Deployment) -> GatewayProcess:
    return deployment.start_gateway(**DEFAULT_LEASE)


async def _budgeted(
    deployment: Deployment, gateway: GatewayProcess, images: int, **limits: Any
) -> tuple[str, str, int]:
    """A key whose total budget is exactly ``images`` square images: (id, secret, budget)."""
    budget = images * SQUARE_COST
    key_id, key = await deployment.create_key(
        gateway, budget_usd=f"{budget / 1e6:.6f}", budget_period="total", **limits
    )
    return key_id, key, budget


async def _usage(gateway: GatewayProcess, key: str) -> dict[str, Any]:
    async with gateway.client(key) as client:
        response = await client.get("/v1/usage")
    assert response.status_code == 200, response.text
    return dict(response.json())


async def _quiet(gateway: GatewayProcess, key: str, within_s: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + within_s
    usage: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            usage = await _usage(gateway, key)
        except httpx.HTTPError:
            usage = {}
        if usage and usage["held_usd"] == "0.000000" and usage["in_flight"] == 0:
            return usage
        await asyncio.sleep(0.1)
    raise AssertionError(f"not quiet within {within_s}s: {usage}")


async def assert_money_exact(
    deployment: Deployment,
    gateway: GatewayProcess,
    key_id: str,
    key: str,
    budget_micro: int,
    *,
    within_s: float = 20.0,
    others: tuple[tuple[str, str], ...] = (),
) -> int:
    """The money invariant over the test's keys (``key`` plus ``others`` as (id, secret));
    returns what ``key`` was charged."""
    accounts = [(key_id, key), *others]
    usages = [await _quiet(gateway, secret, within_s) for _, secret in accounts]
    produced = [r for r in deployment.sandbox_requests() if r["status"] == "completed"]
    expected = sum(cost_of(r["pixels"]) for r in produced)
    assert sum(micro(u["spent_usd"]) for u in usages) == expected, (usages, produced)

    settles: list[dict[str, Any]] = []
    for account_id, _ in accounts:
        ledger = await deployment.ledger(gateway, account_id)
        settles += [e for e in ledger if e["event"] == "settle"]
        holds = [e["request_id"] for e in ledger if e["event"] == "hold"]
        resolved = [e["request_id"] for e in ledger if e["event"] in ("settle", "release")]
        assert sorted(holds) == sorted(resolved)  # every hold resolved, exactly once
    assert sum(e["amount_micro"] for e in settles) == expected
    # Every settle is for a job fal produced, once; every produced job is settled once.
    fal_ids = sorted(e["upstream_request_id"] for e in settles)
    assert fal_ids == sorted(r["request_id"] for r in produced), (settles, produced)

    charged = micro(usages[0]["spent_usd"])
    assert micro(usages[0]["remaining_usd"]) == budget_micro - charged
    # The whole remaining budget is usable: no phantom hold or slot refuses the next request.
    if budget_micro - charged >= SQUARE_COST:
        async with gateway.client(key) as client:
            response = await client.post("/v1/generate", json=SQUARE)
        assert response.status_code == 200, response.text
        assert micro(response.headers["X-Cost-USD"]) == SQUARE_COST
        charged += SQUARE_COST
    return charged


async def _post_all(
    gateway: GatewayProcess, key: str, n: int, *, headers: dict[str, str] | None = None
) -> list[httpx.Response | BaseException]:
    async with gateway.client(key) as client:
        return list(
            await asyncio.gather(
                *(client.post("/v1/generate", json=SQUARE, headers=headers) for _ in range(n)),
                return_exceptions=True,
            )
        )


def _statuses(responses: list[httpx.Response | BaseException]) -> list[int]:
    return sorted(r.status_code if isinstance(r, httpx.Response) else 0 for r in responses)


# --- client-chosen ids ----------------------------------------------------------------------


async def test_a_reused_x_request_id_buys_nothing(
    deployment: Deployment, gateway: GatewayProcess, fresh_sandbox: Deployment
) -> None:
    deployment.configure_sandbox(latency_ms=200)
    key_id, key, budget = await _budgeted(deployment, gateway, 20, rpm=3, max_concurrent=1)
    same = {"X-Request-Id": "client-chosen-1"}
    concurrent = await _post_all(gateway, key, 5, headers=same)
    statuses = _statuses(concurrent)
    assert statuses.count(200) == 1 and statuses.count(429) == 4, statuses
    ok = next(r for r in concurrent if isinstance(r, httpx.Response) and r.status_code == 200)
    # Echoed as the client's correlation id; the gateway's own id is something else.
    assert ok.headers["X-Client-Request-Id"] == "client-chosen-1"
    assert ok.headers["X-Request-Id"].startswith("req_")
    assert ok.headers["X-Request-Id"] != "client-chosen-1"

    # Across keys, the same id is two unrelated requests.
    other_id, other = await deployment.create_key(gateway, budget_usd="1", budget_period="total")
    both = await asyncio.gather(*(_post_all(gateway, k, 1, headers=same) for k in (key, other)))
    assert _statuses(both[1]) == [200]
    assert _statuses(both[0]) == [200]
    charged = await assert_money_exact(
        deployment, gateway, key_id, key, budget, others=((other_id, other),)
    )
    assert charged == 3 * SQUARE_COST  # one of the five, the one across keys, the check's
    other_usage = await _usage(gateway, other)
    assert micro(other_usage["spent_usd"]) == SQUARE_COST


async def test_bad_client_request_ids_are_refused(
    deployment: Deployment, gateway: GatewayProcess, fresh_sandbox: Deployment
) -> None:
    _, key = await deployment.create_key(gateway)
    async with gateway.client(key) as client:
        for bad in (b"x" * 129, b"tab\there", "caf\u00e9".encode()):
            response = await client.post("/v1/generate", json=SQUARE, headers={"X-Request-Id": bad})
            assert response.status_code == 400, response.text
            assert response.json()["error"]["param"] == "X-Request-Id"
        assert (
            await client.get("/v1/usage", headers={"X-Request-Id": "x" * 128})
        ).status_code == 200
    assert deployment.sandbox_requests() == []


# --- Redis paused or killed ----------------------------------------------------------------


def _pause(deployment: Deployment, seconds: float) -> None:
    assert deployment.redis.process is not None
    deployment.redis.process.send_signal(signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        deployment.redis.process.send_signal(signal.SIGCONT)


async def _fal_has(deployment: Deployment, key_id: str, n: int) -> None:
    """Wait until fal accepted ``n`` of the key's jobs and the gateway recorded their ids.

    (Between fal accepting a submit and that write there are a few milliseconds in which a
    crash leaves a hold without fal's id: the resolver can then only release it. The README
    says so; these tests crash the gateway outside that window.)
    """
    store = aioredis.Redis.from_url(deployment.redis.url, decode_responses=True)
    try:
        for _ in range(500):
            holds = [json.loads(h) for h in (await store.hgetall(f"{{k:{key_id}}}:holds")).values()]
            if len(holds) >= n and all(h["upstream"] for h in holds):
                return
            await asyncio.sleep(0.02)
    finally:
        await store.aclose()
    raise AssertionError("fal never had the jobs")


async def test_redis_stalled_during_admission_leaves_no_phantom_hold(
    deployment: Deployment, gateway: GatewayProcess, fresh_sandbox: Deployment
) -> None:
    """Admission replies lost to a 1.5 s stall: the clients were told 503 'nothing was
    charged', and within seconds that is true; nothing refuses the key afterwards."""
    key_id, key, budget = await _budgeted(deployment, gateway, 4, max_concurrent=2)
    await _usage(gateway, key)  # the key is known (cached) before the stall
    async with gateway.client(key) as client:
        stalled = asyncio.create_task(asyncio.to_thread(_pause, deployment, 1.5))
        await asyncio.sleep(0.1)
        responses = await asyncio.gather(
            *(client.post("/v1/generate", json=SQUARE) for _ in range(6)), return_exceptions=True
        )
        await stalled
    statuses = _statuses(list(responses))
    assert 503 in statuses, statuses
    for r in responses:
        if isinstance(r, httpx.Response) and r.status_code == 503:
            assert "nothing was charged" in r.json()["error"]["message"]
    # Well inside the 15 s hold lease: the gateway released the lost admissions by itself.
    await assert_money_exact(deployment, gateway, key_id, key, budget, within_s=5)


async def test_redis_stalled_during_settle_still_bills_the_work(
    deployment: Deployment, gateway: GatewayProcess, fresh_sandbox: Deployment
) -> None:
    deployment.configure_sandbox(latency_ms=600)
    key_id, key, budget = await _budgeted(deployment, gateway, 10)
    requests = asyncio.create_task(_post_all(gateway, key, 4))
    await _fal_has(deployment, key_id, 4)
    await asyncio.to_thread(_pause, deployment, 1.5)  # fal finishes while Redis is stalled
    statuses = _statuses(await requests)
    assert statuses == [200] * 4, statuses
    charged = await assert_money_exact(deployment, gateway, key_id, key, budget)
    assert charged == 5 * SQUARE_COST


async def test_redis_killed_and_restarted_under_load(
    deployment: Deployment, gateway: GatewayProcess, fresh_sandbox: Deployment
) -> None:
    deployment.configure_sandbox(latency_ms=100)
    key_id, key, budget = await _budgeted(deployment, gateway, 200)

    async def load() -> list[int]:
        seen: list[int] = []
        async with gateway.client(key) as client:
            for _ in range(15):
                batch = await asyncio.gather(
                    *(client.post("/v1/generate", json=SQUARE) for _ in range(4)),
                    return_exceptions=True,
                )
                seen += _statuses(list(batch))
        return seen

    running = asyncio.create_task(load())
    await asyncio.sleep(0.5)
    server = deployment.redis
    assert server.process is not None
    server.process.kill()  # kill -9
    server.process.wait()
    await asyncio.sleep(0.5)
    server.start()  # same port, password and AOF: what was acknowledged is still there
    seen = await running
    assert 200 in seen and set(seen) <= {200, 503}, seen
    await assert_money_exact(deployment, gateway, key_id, key, budget)


# --- gateways killed ------------------------------------------------------------------------


async def test_gateway_killed_mid_flight_is_resolved_by_another_within_a_lease(
    deployment: Deployment, gateway: GatewayProcess, fresh_sandbox: Deployment
) -> None:
    deployment.configure_sandbox(latency_ms=800)
    victim = deployment.start_gateway(**DEFAULT_LEASE)
    key_id, key, budget = await _budgeted(deployment, gateway, 10)
    doomed = asyncio.create_task(_post_all(victim, key, 4))
    await _fal_has(deployment, key_id, 4)
    victim.kill()
    await doomed
    # Another gateway's resolver asks fal and settles within a 15 s lease plus one sweep.
    charged = await assert_money_exact(deployment, gateway, key_id, key, budget, within_s=20)
    assert charged == 5 * SQUARE_COST


async def _holds(deployment: Deployment, key_id: str) -> list[dict[str, Any]]:
    store = aioredis.Redis.from_url(deployment.redis.url, decode_responses=True)
    try:
        raw = await store.hgetall(f"{{k:{key_id}}}:holds")
    finally:
        await store.aclose()
    return [json.loads(h) for h in raw.values()]


async def _until(condition: Any, what: str, within_s: float = 20.0) -> None:
    deadline = time.monotonic() + within_s
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never: {what}")
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("mode", ["queue", "sync"])
async def test_a_gateway_frozen_past_its_leases_bills_what_fal_did_meanwhile(
    mode: str, deployment: Deployment, gateway: GatewayProcess, fresh_sandbox: Deployment
) -> None:
    """A gateway process stopped (SIGSTOP) for longer than its holds' lease, before fal's ids
    reached Redis: another process's resolver releases the holds as abandoned and fal does
    every job meanwhile. When the process goes on, its requests put their holds back (queue
    mode: when fal's id is recorded; sync mode: when the images are settled), every client
    gets its images, and the ledger has exactly what fal produced, each job settled once."""
    victim = deployment.start_gateway(
        FALGATE_UPSTREAM_MODE=mode, FALGATE_HOLD_LEASE_S="2", FALGATE_AUTH_CACHE_TTL_S="60"
    )
    n = 6
    if mode == "queue":  # fal accepts the jobs only while the process is stopped
        deployment.configure_sandbox(
            latency_ms=300,
            faults=[{"kind": "delay", "scope": "submit", "delay_ms": 1500, "count": n}],
        )
    else:  # fal is generating when the process is stopped
        deployment.configure_sandbox(latency_ms=1500)
    key_id, key, budget = await _budgeted(deployment, gateway, 20)
    requests = asyncio.create_task(_post_all(victim, key, n))

    async def held_without_fal_ids() -> bool:
        holds = await _holds(deployment, key_id)
        return len(holds) == n and not any(h["upstream"] for h in holds)

    await _until(held_without_fal_ids, f"{n} holds without fal's ids")
    victim.proc.send_signal(signal.SIGSTOP)
    try:

        async def abandoned_and_done() -> bool:
            jobs = deployment.sandbox_requests()
            finished = len(jobs) == n and all(j["status"] == "completed" for j in jobs)
            return finished and not await _holds(deployment, key_id)

        await _until(abandoned_and_done, "holds released by the resolver, fal's jobs done")
    finally:
        victim.proc.send_signal(signal.SIGCONT)
    statuses = _statuses(await requests)
    assert statuses == [200] * n, statuses
    charged = await assert_money_exact(deployment, gateway, key_id, key, budget)
    assert charged == (n + 1) * SQUARE_COST
    ledger = await deployment.ledger(gateway, key_id)
    reasons = sorted(e["reason"] for e in ledger if e["event"] in ("hold", "release"))
    assert reasons.count("abandoned") == reasons.count("reinstated") == n, reasons
    victim.kill()


async def test_same_idempotency_key_on_two_processes_with_the_owner_killed(
    deployment: Deployment, gateway: GatewayProcess, fresh_sandbox: Deployment
) -> None:
    """The retry neither runs the job again nor gives up: it attaches to fal's job of the
    first attempt, settled by the resolver after the owner died, and answers its outcome."""
    deployment.configure_sandbox(latency_ms=1500)
    owner = deployment.start_gateway(**DEFAULT_LEASE)
    key_id, key, budget = await _budgeted(deployment, gateway, 10)
    idem = {"Idempotency-Key": "chaos-idem-1"}
    first = asyncio.create_task(_post_all(owner, key, 1, headers=idem))
    await _fal_has(deployment, key_id, 1)
    async with gateway.client(key) as client:
        retry = asyncio.create_task(client.post("/v1/generate", json=SQUARE, headers=idem))
        await asyncio.sleep(0.3)
        owner.kill()
        await first
        response = await retry
    assert response.status_code == 200, response.text
    assert response.headers["Idempotent-Replayed"] == "true"
    (job,) = deployment.sandbox_requests()
    assert job["status"] == "completed"
    assert [i["width"] for i in response.json()["images"]] == [512]
    assert micro(response.json()["cost"]["amount_usd"]) == SQUARE_COST
    charged = await assert_money_exact(deployment, gateway, key_id, key, budget)
    assert charged == 2 * SQUARE_COST  # the one job, and the usability check's


# --- a burst --------------------------------------------------------------------------------


async def test_300_concurrent_requests_on_one_process_get_no_503(
    deployment: Deployment, gateway: GatewayProcess, fresh_sandbox: Deployment
) -> None:
    key_id, key, budget = await _budgeted(deployment, gateway, 400)
    statuses = _statuses(await _post_all(gateway, key, 300))
    assert statuses == [200] * 300, {s: statuses.count(s) for s in set(statuses)}
    charged = await assert_money_exact(deployment, gateway, key_id, key, budget)
    assert charged == 301 * SQUARE_COST


async def test_requests_record_tells_the_outcome_to_its_owner_only(
    deployment: Deployment, gateway: GatewayProcess, fresh_sandbox: Deployment
) -> None:
    _, key = await deployment.create_key(gateway)
    _, other = await deployment.create_key(gateway)
    async with gateway.client(key) as client:
        done = await client.post("/v1/generate", json=SQUARE)
        request_id = done.headers["X-Request-Id"]
        record = await client.get(f"/v1/requests/{request_id}")
        assert record.status_code == 200
        body = record.json()
        assert body["status"] == "completed" and body["request_id"] == request_id
        assert body["images"] == done.json()["images"]
        assert body["cost"]["amount_usd"] == done.json()["cost"]["amount_usd"]
        (job,) = deployment.sandbox_requests()
        assert body["upstream_request_id"] == job["request_id"]
        for bogus in ("req_" + "0" * 32, "nope", "../../etc"):
            assert (await client.get(f"/v1/requests/{bogus}")).status_code == 404
    async with gateway.client(other) as client:
        stranger = await client.get(f"/v1/requests/{request_id}")
    assert stranger.status_code == 404
    assert json.loads(stranger.text)["error"]["type"] == "not_found"
