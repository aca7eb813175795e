"""Every fault the sandbox can inject reaches the client as SPEC section 6 says, and the key is
charged exactly what fal produced: nothing when fal never accepted the job (the hold is
released at once), and what fal made when it did (the resolver asks fal, SPEC section 10)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio as aioredis

from app.metering import keyspace
from app.metering.meter import Meter
from app.metering.sweeper import Sweeper
from app.settings import Settings
from app.upstream.client import FalClient
from tests.conftest import Gateway, GatewayFactory, Sandbox
from tests.money import micro, produced_cost, quiet_usage

FAL_SECRET = "fal-central-id:fal-central-secret-DO-NOT-LEAK"


# Short upstream timeouts and quick retries, so every failure path is reached in seconds.
FAST_FAILURES = {
    "FALGATE_UPSTREAM_REQUEST_TIMEOUT_S": "3",
    "FALGATE_UPSTREAM_READ_TIMEOUT_S": "1.5",
    "FALGATE_UPSTREAM_RETRY_BACKOFF_S": "0.01",
    "FALGATE_UPSTREAM_MAX_RETRIES": "2",
    "FALGATE_SWEEPER_INTERVAL_S": "0.3",
}


@pytest.fixture(scope="module")
def faulty(gateways: GatewayFactory) -> Iterator[Gateway]:
    """A gateway in queue mode with fast failures."""
    gateway = gateways.start(**FAST_FAILURES)
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def faulty_sync(gateways: GatewayFactory) -> Iterator[Gateway]:
    gateway = gateways.start(FALGATE_UPSTREAM_MODE="sync", **FAST_FAILURES)
    yield gateway
    gateway.stop()


# Faults before fal accepted the job: nothing reaches fal's queue, nothing may be charged.
FAULTS: list[tuple[dict[str, Any], int, str]] = [
    ({"kind": "error", "scope": "generate", "status_code": 422}, 400, "invalid_request"),
    ({"kind": "error", "scope": "generate", "status_code": 500}, 502, "upstream_error"),
    ({"kind": "error", "scope": "generate", "status_code": 502}, 502, "upstream_error"),
    ({"kind": "error", "scope": "generate", "status_code": 503}, 502, "upstream_error"),
    ({"kind": "timeout", "scope": "generate", "user_timeout": True}, 504, "upstream_timeout"),
    ({"kind": "rate_limit", "scope": "generate"}, 502, "upstream_error"),
    ({"kind": "drop", "scope": "generate"}, 502, "upstream_error"),
    ({"kind": "hang", "scope": "generate"}, 504, "upstream_timeout"),
    ({"kind": "bad_key", "scope": "generate"}, 503, "unavailable"),
    ({"kind": "locked", "scope": "generate"}, 503, "unavailable"),
]
# Faults after fal accepted the job: the key pays for whatever fal produced, exactly.
JOB_FAULTS: list[tuple[dict[str, Any], int, str]] = [
    ({"kind": "error", "scope": "job", "status_code": 422}, 400, "invalid_request"),
    ({"kind": "error", "scope": "job", "status_code": 500}, 502, "upstream_error"),
    ({"kind": "hang", "scope": "job"}, 504, "upstream_timeout"),
    ({"kind": "error", "scope": "status", "status_code": 500}, 502, "upstream_error"),
    ({"kind": "error", "scope": "result", "status_code": 500}, 502, "upstream_error"),
    ({"kind": "locked", "scope": "status"}, 503, "unavailable"),
    # One slow status poll (longer than the read timeout): retried, the job is billed.
    ({"kind": "delay", "scope": "status", "delay_ms": 2500, "count": 1}, 200, ""),
]


def _run_fault(
    gateway: Gateway, sandbox: Sandbox, fault: dict[str, Any], status: int, type_: str
) -> None:
    _, key = gateway.create_key(name="faults", budget_usd="10")
    sandbox.configure(faults=[fault])
    with gateway.client(key) as client:
        response = client.post("/v1/generate", json={"prompt": "x"})
        # fal recovers; the gateway must then learn what became of the job by itself.
        sandbox.configure(faults=[])
        assert response.status_code == status, response.text
        assert "fal-central" not in response.text and "DO-NOT-LEAK" not in response.text
        assert "Exhausted balance" not in response.text and "No user found" not in response.text
        usage = quiet_usage(client)
        produced = [r for r in sandbox.requests() if r["protocol"] in ("queue", "sync")]
        expected = produced_cost(produced)
        assert micro(usage["spent_usd"]) == expected, (usage, produced)
        assert micro(usage["remaining_usd"]) == 10_000_000 - expected
        if status == 200:
            assert expected > 0
            return
        error = response.json()["error"]
        assert error["type"] == type_
        outcome = client.get(f"/v1/requests/{error['request_id']}")
        if fault["scope"] in ("job", "status", "result"):
            # fal accepted the job: the error says where its outcome is, and it is there.
            assert f"/v1/requests/{error['request_id']}" in error["message"]
            assert outcome.status_code == 200, outcome.text
            record = outcome.json()
            assert record["upstream_request_id"] == produced[0]["request_id"]
            assert micro(record["cost"]["amount_usd"] if record["cost"] else "0") == expected
            # Nothing produced: fal failed it, or it was cancelled when the gateway gave up.
            assert record["status"] in (("completed",) if expected else ("failed", "cancelled"))
        else:
            assert expected == 0
    sandbox.reset()


@pytest.mark.parametrize(("fault", "status", "type_"), FAULTS + JOB_FAULTS)
def test_queue_mode_fault(
    faulty: Gateway, clean_sandbox: Sandbox, fault: dict[str, Any], status: int, type_: str
) -> None:
    _run_fault(faulty, clean_sandbox, fault, status, type_)


@pytest.mark.parametrize(("fault", "status", "type_"), FAULTS)
def test_sync_mode_fault(
    faulty_sync: Gateway, clean_sandbox: Sandbox, fault: dict[str, Any], status: int, type_: str
) -> None:
    fault = {**fault, "scope": "run" if fault["scope"] == "generate" else fault["scope"]}
    _run_fault(faulty_sync, clean_sandbox, fault, status, type_)


def test_fal_validation_message_is_passed_on(faulty: Gateway, clean_sandbox: Sandbox) -> None:
    _, key = faulty.create_key(name="fal-422")
    detail = [{"loc": ["body", "prompt"], "msg": "prompt is unsafe", "type": "content_policy"}]
    clean_sandbox.configure(
        faults=[{"kind": "error", "scope": "generate", "status_code": 422, "detail": detail}]
    )
    with faulty.client(key) as client:
        response = client.post("/v1/generate", json={"prompt": "x"})
    assert response.status_code == 400
    assert "prompt is unsafe" in response.json()["error"]["message"]


def test_transient_faults_are_retried(faulty: Gateway, clean_sandbox: Sandbox) -> None:
    _, key = faulty.create_key(name="retry")
    clean_sandbox.configure(
        faults=[{"kind": "error", "scope": "submit", "status_code": 503, "count": 2}]
    )
    with faulty.client(key) as client:
        response = client.post("/v1/generate", json={"prompt": "x"})
    assert response.status_code == 200, response.text


def test_client_disconnect_cancels_upstream_and_releases(
    faulty: Gateway, clean_sandbox: Sandbox
) -> None:
    _, key = faulty.create_key(name="gone", budget_usd="10")
    clean_sandbox.configure(faults=[{"kind": "hang", "scope": "job"}])
    with faulty.client(key) as client, pytest.raises(httpx.ReadTimeout):
        client.post("/v1/generate", json={"prompt": "walk away"}, timeout=0.8)
    deadline = time.monotonic() + 10
    states: list[str] = []
    while time.monotonic() < deadline:
        states = [str(r.get("status")) for r in clean_sandbox.requests()]
        if states and all(s == "cancelled" for s in states):
            break
        time.sleep(0.1)
    assert states and all(s == "cancelled" for s in states), clean_sandbox.requests()
    with faulty.client(key) as client:
        usage = quiet_usage(client)
    # fal cancelled the job before it produced anything: nothing to bill.
    assert produced_cost(clean_sandbox.requests()) == 0
    assert (usage["spent_usd"], usage["remaining_usd"]) == ("0.000000", "10.000000")


def test_real_mode_never_leaks_the_fal_key(gateways: GatewayFactory, sandbox: Sandbox) -> None:
    """With a real fal key (pointed at the sandbox), fal's 401/403 become a generic 503 and the
    key appears in no response and no log line."""
    gateway = gateways.start(
        FALGATE_FAL_KEY=FAL_SECRET,
        FALGATE_FAL_RUN_URL=sandbox.url,
        FALGATE_FAL_QUEUE_URL=sandbox.url + "/queue",
        FALGATE_LOG_LEVEL="debug",
    )
    try:
        _, key = gateway.create_key(name="real-mode", budget_usd="10")
        with gateway.client(key) as client:
            assert client.post("/v1/generate", json={"prompt": "ok"}).status_code == 200
            for kind in ("bad_key", "locked"):
                sandbox.configure(faults=[{"kind": kind, "scope": "any"}])
                response = client.post("/v1/generate", json={"prompt": "x"})
                sandbox.reset()
                assert response.status_code == 503
                assert "DO-NOT-LEAK" not in response.text and "fal-central" not in response.text
        assert "DO-NOT-LEAK" not in gateway.output()
        assert "fal-central" not in gateway.output()
    finally:
        sandbox.reset()
        gateway.stop()


def test_real_fal_key_without_admin_token_refuses_to_start(tmp_path: Any) -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("FALGATE_")}
    env.update({"FAL_KEY": FAL_SECRET, "FALGATE_DATA_DIR": str(tmp_path)})
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "FALGATE_ADMIN_TOKEN" in result.stderr
    assert "DO-NOT-LEAK" not in result.stderr + result.stdout


def _held_while(caller: threading.Thread, store: redis.Redis, key_id: str) -> str:
    """Start ``caller`` and return the id of the one hold it places."""
    started = time.monotonic()
    caller.start()
    held: list[str] = []
    while not held and time.monotonic() < started + 10:
        held = [str(field) for field in store.hkeys(keyspace.holds(key_id))]
        time.sleep(0.02)
    assert len(held) == 1
    return held[0]


def _abandon(redis_url: str, sandbox_url: str, key_id: str, request_id: str) -> None:
    """The resolver's own release of a hold whose lease ran out (as when its process was cut
    off from Redis for a lease or more): the lease is made due, one resolver (the real one,
    with the real fal client on the sandbox) sweeps it."""

    async def sweep() -> list[str]:
        client = aioredis.Redis.from_url(redis_url)
        settings = Settings(fal_run_url=sandbox_url, fal_queue_url=f"{sandbox_url}/queue")
        fal = FalClient(settings)
        await fal.start()
        try:
            resolver = Sweeper(client, settings, "proc_test_resolver", fal)
            for _ in range(100):  # the live request may renew the lease in between: again
                await client.zadd(keyspace.leases(key_id), {request_id: 0})
                if released := (await resolver.resolve_one(key_id, request_id)).released:
                    return released
                await asyncio.sleep(0.01)
            return []
        finally:
            await fal.aclose()
            await client.aclose()

    assert asyncio.run(sweep()) == [request_id]


def _ledger(gateway: Gateway, key_id: str) -> list[tuple[str, str]]:
    with gateway.admin() as admin:
        response = admin.get("/admin/ledger", params={"key_id": key_id})
    assert response.status_code == 200, response.text
    rows = [json.loads(line) for line in response.text.splitlines()]
    return [(row["event"], row["reason"]) for row in rows]


@pytest.mark.parametrize("mode", ["queue", "sync"])
def test_a_job_fal_did_after_the_resolver_gave_its_request_up_is_billed(
    mode: str,
    faulty: Gateway,
    faulty_sync: Gateway,
    clean_sandbox: Sandbox,
    redis_url: str,
) -> None:
    """A live request whose hold the resolver released because its lease ran out (its process
    stalled or lost Redis for a lease) while fal worked on its job, or was slow to accept it:
    the hold is put back when fal's id (queue mode) or images (sync mode) reach Redis, the
    client gets its images, and the key pays exactly what fal produced."""
    gateway = faulty if mode == "queue" else faulty_sync
    key_id, key = gateway.create_key(name="stalled", budget_usd="10")
    # Within the gateway's 3 s deadline: in queue mode the release lands while fal is slow
    # to accept the submit, in sync mode while fal generates.
    if mode == "queue":
        clean_sandbox.configure(
            latency_ms=300,
            faults=[{"kind": "delay", "scope": "submit", "delay_ms": 1200, "count": 1}],
        )
    else:
        clean_sandbox.configure(latency_ms=1200)
    store = redis.Redis.from_url(redis_url, decode_responses=True)
    answers: list[httpx.Response] = []
    reinstated = gateway.metric("falgate_holds_reinstated_total")

    def call() -> None:
        with gateway.client(key) as client:
            answers.append(client.post("/v1/generate", json={"prompt": "x"}))

    caller = threading.Thread(target=call)
    request_id = _held_while(caller, store, key_id)
    _abandon(redis_url, clean_sandbox.url, key_id, request_id)
    assert not store.hexists(keyspace.holds(key_id), request_id)
    caller.join(timeout=30)
    [response] = answers
    assert response.status_code == 200, response.text
    [job] = clean_sandbox.requests()
    cost = produced_cost([job])
    assert job["status"] == "completed" and cost > 0
    assert micro(response.json()["cost"]["amount_usd"]) == cost
    with gateway.client(key) as client:
        usage = quiet_usage(client)
        record = client.get(f"/v1/requests/{request_id}").json()
    assert micro(usage["spent_usd"]) == cost
    assert (record["status"], micro(record["cost"]["amount_usd"])) == ("completed", cost)
    assert _ledger(gateway, key_id) == [
        ("hold", ""),
        ("release", "abandoned"),
        ("hold", "reinstated"),
        ("settle", "completed"),
    ]
    # Operators are told: the process was stalled or cut off, the key may be over budget.
    assert gateway.metric("falgate_holds_reinstated_total") == reinstated + 1
    assert f"request {request_id} was released as abandoned" in gateway.output()


def test_a_hold_resolved_otherwise_when_fal_accepts_the_job_cancels_the_job(
    faulty: Gateway, clean_sandbox: Sandbox, redis_url: str
) -> None:
    """fal's request id is recorded on the hold while the gateway already follows the job
    (issue 15). If the reply is that the hold is gone and was not given up for dead by the
    resolver (here released by hand), nothing can bill the job: the gateway stops following
    it at once, fal is told to cancel, and the client gets a 502 with nothing charged."""
    key_id, key = faulty.create_key(name="stale", budget_usd="10")
    clean_sandbox.configure(
        latency_ms=5000,  # still generating when the reply comes: a cancel is what ends it
        faults=[{"kind": "delay", "scope": "submit", "delay_ms": 800, "count": 1}],
    )
    store = redis.Redis.from_url(redis_url, decode_responses=True)
    release = Meter(store, Settings(), "proc_test").release_id_call
    answers: list[httpx.Response] = []

    def call() -> None:
        with faulty.client(key) as client:
            answers.append(client.post("/v1/generate", json={"prompt": "x"}))

    request_id = _held_while(threading.Thread(target=call), store, key_id)
    assert not clean_sandbox.requests()  # held, fal not there yet
    script = release(key_id, request_id, "lease_expired")
    keys, args = script.keys, script.args
    sha = store.script_load(script.script.source)
    assert store.evalsha(sha, len(keys), *keys, *args)[0] == "ok"
    deadline = time.monotonic() + 30
    while not answers and time.monotonic() < deadline:
        time.sleep(0.05)
    [response] = answers
    assert response.status_code == 502, response.text
    assert "hold was resolved" in response.json()["error"]["message"]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and clean_sandbox.requests()[0]["status"] != "cancelled":
        time.sleep(0.05)
    [job] = clean_sandbox.requests()
    assert job["status"] == "cancelled", job  # stopped, not followed to its end
    assert produced_cost([job]) == 0
    with faulty.client(key) as client:
        usage = quiet_usage(client)
    assert (usage["spent_usd"], usage["remaining_usd"]) == ("0.000000", "10.000000")
