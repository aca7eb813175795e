"""An admitted request costs two Redis round trips: admit (+ upstream slot), settle (+ release),
each ONE command (a composite script on a single Redis, issue 15).

In queue mode a third records fal's request id on the hold as soon as fal accepted the job
(``attach.lua``): without it a crash while fal works would leave a hold the resolver cannot
ask fal about. Following the job (fal's status stream) costs no Redis at all.

Counted by Redis itself (``INFO stats`` ``total_reads_processed``), not by timing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from app.redis import EmbeddedRedis
from tests.conftest import GatewayFactory

REQUESTS = 20


def _reads(client: redis.Redis) -> int:
    return int(client.info("stats")["total_reads_processed"])


def _script_calls(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return sum(
        int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("evalsha", "eval")
    )


@pytest.mark.parametrize("multiplex", ["true", "false"])  # false: redis-py's pooled client
@pytest.mark.parametrize(("mode", "per_request"), [("sync", 2), ("queue", 3)])
def test_two_round_trips_per_admitted_request(
    gateways: GatewayFactory, tmp_path: Path, mode: str, per_request: int, multiplex: str
) -> None:
    own = EmbeddedRedis(tmp_path / "redis", persist=False)
    own.start()
    gateway = gateways.start(
        FALGATE_REDIS_URL=own.url,
        FALGATE_UPSTREAM_MODE=mode,
        FALGATE_REDIS_MULTIPLEX=multiplex,
        FALGATE_HOLD_LEASE_S="600",  # no hold lease renewals either
        FALGATE_AUTH_CACHE_TTL_S="600",  # the key is looked up once, then cached
        FALGATE_SWEEPER_INTERVAL_S="3600",
        FALGATE_PROCESS_LEASE_S="600",  # no lease renewals during the measurement
        FALGATE_LEDGER_DRAIN_INTERVAL_S="0",  # nor ledger drains
    )
    probe = redis.Redis.from_url(own.url)
    try:
        _, secret = gateway.create_key(name="round-trips", budget_usd="10")
        with gateway.client(secret) as client:
            body = {"prompt": "x", "image_size": "square"}
            assert client.post("/v1/generate", json=body).status_code == 200  # warm caches
            before, scripts_before = _reads(probe), _script_calls(probe)
            for _ in range(REQUESTS):
                assert client.post("/v1/generate", json=body).status_code == 200
            after, scripts_after = _reads(probe), _script_calls(probe)
        # ``after`` includes the second INFO calls themselves.
        assert after - before - 2 <= per_request * REQUESTS, after - before
        # One script call per round trip: admission and the upstream slot are one command.
        assert scripts_after - scripts_before <= per_request * REQUESTS
    finally:
        probe.close()
        gateway.stop()
        own.stop()
