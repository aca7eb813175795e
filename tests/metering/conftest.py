"""A real ``redis-server`` for the metering and rate-limit unit tests (no fakes)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from app.catalog.pricing import Price
from app.redis import EmbeddedRedis, free_port
from app.settings import Settings
from tests.conftest import _stop, _wait_http, gateway_env, spawn_gateway


@pytest.fixture(scope="session")
def metering_redis_server(private_redis_server: EmbeddedRedis) -> EmbeddedRedis:
    return private_redis_server


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path,
        default_rpm=100_000,
        default_max_concurrent=10_000,
        # Generous: 200 concurrent scripts on a busy 2-core machine are slow, not an outage.
        redis_socket_timeout_s=2.0,
        redis_connect_timeout_s=2.0,
    )


def client_for(url: str, settings: Settings, **kwargs: Any) -> aioredis.Redis:
    return aioredis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=settings.redis_socket_timeout_s,
        socket_connect_timeout=settings.redis_connect_timeout_s,
        max_connections=kwargs.pop("max_connections", 1000),
        **kwargs,
    )


@pytest.fixture
async def r(metering_redis_server: EmbeddedRedis, settings: Settings) -> AsyncIterator[Any]:
    client = client_for(metering_redis_server.url, settings)
    await client.flushall()
    yield client
    await client.aclose()


async def _make_key(
    r: Any,
    key_id: str,
    *,
    budget_micro: int | None = None,
    period: str = "total",
    rpm: int | None = None,
    max_concurrent: int | None = None,
    status: str = "active",
    expires_at: float | None = None,
) -> None:
    """Write a key record the way the keys service does."""
    await r.hset(
        f"{{k:{key_id}}}:meta",
        mapping={
            "id": key_id,
            "name": key_id,
            "status": status,
            "created_at": str(int(time.time())),
            "expires_at": "" if expires_at is None else str(expires_at),
            "budget_micro": "" if budget_micro is None else str(budget_micro),
            "budget_period": period,
            "rpm": "" if rpm is None else str(rpm),
            "max_concurrent": "" if max_concurrent is None else str(max_concurrent),
            "models": "",
        },
    )
    await r.sadd("falgate:keys", key_id)


@pytest.fixture
def make_key(r: Any) -> Any:
    """``await make_key("key_a", budget_micro=..., period=..., rpm=..., ...)``."""

    async def make(key_id: str, **fields: Any) -> None:
        await _make_key(r, key_id, **fields)

    return make


def _price(amount: int, pixels: int = 1_000_000, unit_price: int = 15_000) -> Price:
    return Price(amount=amount, pixels=pixels, unit_price=unit_price)


@pytest.fixture
def price() -> Any:
    """``price(amount, pixels=..., unit_price=...)`` -> a :class:`Price`."""
    return _price


@pytest.fixture
def meter(r: Any, settings: Settings) -> Any:
    from app.metering import Meter

    return Meter(r, settings, "proc_test")


@pytest.fixture
def write_key() -> Any:
    """``await write_key(client, key_id, **fields)`` for a client of another server."""
    return _make_key


@pytest.fixture
def connect(settings: Settings) -> Any:
    """``connect(url)`` -> a client configured like the gateway's (short timeouts)."""
    return lambda url: client_for(url, settings)


# --- an isolated deployment for the end-to-end tests -------------------------------------
#
# Its own Redis, its own sandbox and its own `falgate serve` processes: these tests kill
# gateways and restart Redis, and a sweeper must ask the same fal (sandbox) the dead process
# used, so nothing is shared with the rest of the suite.

ADMIN = "metering-admin-token-0123456789abcdef"
ROOT = Path(__file__).resolve().parent.parent.parent


@dataclass
class GatewayProcess:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def client(self, key: str | None = None) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        limits = httpx.Limits(max_connections=400, max_keepalive_connections=100)
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=60, limits=limits)

    def kill(self) -> None:
        _stop(self.proc, signal.SIGKILL)


@dataclass
class Deployment:
    tmp: Path
    redis: EmbeddedRedis
    sandbox_url: str
    sandbox_proc: subprocess.Popen[bytes]
    started: list[GatewayProcess] = field(default_factory=list)

    def start_gateway(self, **env: str) -> GatewayProcess:
        port = free_port()
        data_dir = self.tmp / f"gw-{port}"
        data_dir.mkdir()
        full_env = gateway_env(
            port=port,
            data_dir=data_dir,
            redis_url=self.redis.url,
            sandbox_url=self.sandbox_url,
            ledger_url=f"sqlite:///{self.tmp / 'ledger.sqlite3'}",
            admin_token=ADMIN,
            **{"FALGATE_SWEEPER_INTERVAL_S": "0.3", "FALGATE_PROCESS_LEASE_S": "1.5", **env},
        )
        proc, log = spawn_gateway(full_env, data_dir)
        gateway = GatewayProcess(f"http://127.0.0.1:{port}", proc, log)
        _wait_http(f"{gateway.url}/healthz", proc, log)
        self.started.append(gateway)
        return gateway

    def configure_sandbox(self, **config: Any) -> None:
        httpx.put(f"{self.sandbox_url}/_sandbox/config", json=config, timeout=5).raise_for_status()

    def reset_sandbox(self) -> None:
        httpx.post(f"{self.sandbox_url}/_sandbox/reset", timeout=5).raise_for_status()

    def sandbox_requests(self) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.sandbox_url}/_sandbox/requests", timeout=5)
        response.raise_for_status()
        return list(response.json()["requests"])

    def admin(self, gateway: GatewayProcess) -> httpx.AsyncClient:
        return gateway.client(ADMIN)

    async def create_key(self, gateway: GatewayProcess, **fields: Any) -> tuple[str, str]:
        fields.setdefault("name", "metering-e2e")
        async with self.admin(gateway) as admin:
            response = await admin.post("/admin/keys", json=fields)
        assert response.status_code == 201, response.text
        return response.json()["id"], response.json()["key"]

    async def ledger(self, gateway: GatewayProcess, key_id: str) -> list[dict[str, Any]]:
        async with self.admin(gateway) as admin:
            response = await admin.get("/admin/ledger", params={"key_id": key_id})
        assert response.status_code == 200, response.text
        return [json.loads(line) for line in response.text.splitlines()]

    def stop(self) -> None:
        for gateway in self.started:
            _stop(gateway.proc)
        _stop(self.sandbox_proc)
        self.redis.stop()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    tmp = tmp_path_factory.mktemp("metering-e2e")
    redis_server = EmbeddedRedis(tmp / "redis", persist=True)
    redis_server.start()
    port = free_port()
    log = tmp / "sandbox.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "sandbox", "--port", str(port), "--latency-ms", "0"],
        cwd=ROOT,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    sandbox_url = f"http://127.0.0.1:{port}"
    _wait_http(f"{sandbox_url}/_sandbox/requests", proc, log)
    deployed = Deployment(tmp, redis_server, sandbox_url, proc)
    try:
        yield deployed
    finally:
        deployed.stop()


@pytest.fixture(scope="module")
def pair(deployment: Deployment) -> tuple[GatewayProcess, GatewayProcess]:
    """Two gateway processes sharing the deployment's Redis and sandbox."""
    return deployment.start_gateway(), deployment.start_gateway()


@pytest.fixture
def fresh_sandbox(deployment: Deployment) -> Iterator[Deployment]:
    """The deployment with its sandbox reset (no latency, no faults) before and after."""
    deployment.reset_sandbox()
    deployment.configure_sandbox(latency_ms=0)
    yield deployment
    deployment.reset_sandbox()
