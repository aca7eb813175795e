"""``falgate serve --workers 2`` with nothing configured: one port, two server processes.

The parent starts the private Redis and the sandbox once and hands their URLs to the workers;
requests are answered by both workers (the ledger names two process ids), ``/metrics`` on any
worker counts the requests of both, a budget is exact across them, and SIGTERM stops every
process, the private Redis and the sandbox included.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from app.metering import keyspace
from app.redis import free_port
from tests.conftest import ROOT, _wait_http, redis_answers

# 512 x 512 px at 0.015 USD/MP -> ceil(3932.16) micro-dollars
SQUARE_COST = 3_933
BODY = {"prompt": "a lighthouse at dusk", "image_size": "square"}


@dataclass
class Served:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    data_dir: Path

    @property
    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {(self.data_dir / 'admin_token').read_text()}"}

    def create_key(self, **fields: object) -> tuple[str, str]:
        response = httpx.post(
            f"{self.url}/admin/keys", json={"name": "workers", **fields}, headers=self.admin_headers
        )
        assert response.status_code == 201, response.text
        return response.json()["id"], response.json()["key"]

    def process_ids(self, key_id: str) -> set[str]:
        """The process ids in the key's ledger stream (the exported ledger leaves them out)."""
        url = (self.data_dir / "redis.url").read_text().strip()
        with redis.Redis.from_url(url, decode_responses=True) as client:
            entries = client.xrange(keyspace.ledger(key_id))
        return {fields["process_id"] for _, fields in entries if "process_id" in fields}

    def ledger(self, key_id: str) -> list[dict[str, object]]:
        response = httpx.get(
            f"{self.url}/admin/ledger", params={"key_id": key_id}, headers=self.admin_headers
        )
        assert response.status_code == 200, response.text
        return [json.loads(line) for line in response.text.splitlines()]


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("workers")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FALGATE_", "PROMETHEUS_"))}
    env.pop("FAL_KEY", None)
    env.update(
        {
            "FALGATE_PORT": str(port),
            "FALGATE_SANDBOX_LATENCY_MS": "50",
            "FALGATE_DEFAULT_RPM": "100000",
            "FALGATE_DEFAULT_MAX_CONCURRENT": "1000",
            "FALGATE_AUTH_CACHE_TTL_S": "0",
        }
    )
    (tmp / ".falgate" / "prometheus").mkdir(parents=True)
    (tmp / ".falgate" / "prometheus" / "counter_1.db").write_bytes(b"stale")  # must be cleared
    log = tmp / "serve.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--workers", "2"],
        cwd=tmp,
        env={**env, "PYTHONPATH": str(ROOT)},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{url}/readyz", proc, log)
        for _ in range(300):  # bounded: the second worker may still be starting
            if log.read_text().count("Application startup complete") >= 2:
                break
            time.sleep(0.1)
        yield Served(url=url, proc=proc, log=log, data_dir=tmp / ".falgate")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def _generate(url: str, key: str, count: int) -> list[httpx.Response]:
    """``count`` concurrent requests, each on a connection of its own (so both workers accept)."""

    async def one() -> httpx.Response:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return await client.post(
                "/v1/generate", json=BODY, headers={"Authorization": f"Bearer {key}"}
            )

    return list(await asyncio.gather(*(one() for _ in range(count))))


def _generate_count(metrics: str) -> float:
    pattern = re.compile(r"^falgate_http_requests_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$")
    total = 0.0
    for line in metrics.splitlines():
        match = pattern.match(line)
        if (
            match
            and 'route="/v1/generate"' in match["labels"]
            and 'status="200"' in match["labels"]
        ):
            total += float(match["value"])
    return total


def test_shared_services_started_once(served: Served) -> None:
    output = served.log.read_text()
    assert output.count("started a private Redis server") == 1
    sandbox_urls = set(re.findall(r"built-in fal emulator at (http://[\d.:]+)", output))
    assert len(sandbox_urls) == 1  # both workers name the parent's sandbox
    assert output.count("Started server process") == 2
    assert output.count("SANDBOX MODE (no fal key)") == 1  # the banner, printed by the parent
    assert not (served.data_dir / "prometheus" / "counter_1.db").exists()


def test_requests_land_on_both_workers_and_metrics_add_up(served: Served) -> None:
    key_id, key = served.create_key()
    answered: list[httpx.Response] = []
    processes: set[str] = set()
    for _ in range(10):  # bounded: the kernel spreads new connections over both accept loops
        answered += asyncio.run(_generate(served.url, key, 24))
        processes = served.process_ids(key_id)
        if len(processes) >= 2:
            break
    assert [r.status_code for r in answered] == [200] * len(answered)
    assert len(processes) == 2, processes

    # Any worker's /metrics reports both: the sum of the 200s on /v1/generate is exact.
    for _ in range(6):
        metrics = httpx.get(f"{served.url}/metrics").text
        assert _generate_count(metrics) == len(answered)
    assert "falgate_inflight_requests 0.0" in metrics


def test_budget_is_exact_across_workers(served: Served) -> None:
    n = 7
    key_id, key = served.create_key(
        budget_usd=f"{n * SQUARE_COST / 1_000_000:.6f}", budget_period="total"
    )
    responses = asyncio.run(_generate(served.url, key, 40))
    assert sorted(r.status_code for r in responses) == [200] * n + [402] * (40 - n)
    ledger = served.ledger(key_id)
    settles = [e for e in ledger if e["event"] == "settle"]
    assert sum(int(str(e["amount_micro"])) for e in settles) == n * SQUARE_COST
    usage = httpx.get(f"{served.url}/v1/usage", headers={"Authorization": f"Bearer {key}"})
    assert (usage.json()["spent_usd"], usage.json()["held_usd"]) == (
        f"{n * SQUARE_COST / 1_000_000:.6f}",
        "0.000000",
    )


def test_sigterm_stops_workers_sandbox_and_redis(served: Served) -> None:
    output = served.log.read_text()
    workers = [int(p) for p in re.findall(r"Started server process \[(\d+)\]", output)]
    sandbox_port = int(re.findall(r"built-in fal emulator at http://[\d.]+:(\d+)", output)[0])
    redis_url = (served.data_dir / "redis.url").read_text()
    assert redis_answers(redis_url) and _port_open(sandbox_port)

    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(timeout=60) == 0
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not _port_open(sandbox_port)
    assert not redis_answers(redis_url), "the private Redis server outlived the gateway"
