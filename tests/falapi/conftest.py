"""A real ``falgate serve`` over TLS (its own development CA), the shared sandbox as fal, and
helpers that drive fal's official clients against it and check the money to the micro-dollar.

fal's clients read their hosts and trust store from the environment (``FAL_RUN_HOST``,
``SSL_CERT_FILE``, ``NODE_EXTRA_CA_CERTS``), so each client runs in its own subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.catalog import load_catalog
from app.redis import free_port
from tests.conftest import ADMIN_TOKEN, Sandbox, _stop, gateway_env, spawn_gateway

JS_DIR = Path(__file__).resolve().parent / "js"
CATALOG = load_catalog()


@dataclass
class TlsGateway:
    address: str  # host:port, as FAL_RUN_HOST wants it
    ca_file: Path
    proc: subprocess.Popen[bytes]
    log: Path
    sandbox: Sandbox

    @property
    def url(self) -> str:
        return f"https://{self.address}"

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        context = ssl.create_default_context(cafile=str(self.ca_file))
        return httpx.Client(base_url=self.url, headers=headers, verify=context, timeout=30)

    def create_key(self, **fields: Any) -> tuple[str, str]:
        fields.setdefault("name", "falapi")
        with self.client(ADMIN_TOKEN) as admin:
            response = admin.post("/admin/keys", json=fields)
        assert response.status_code == 201, response.text
        return response.json()["id"], response.json()["key"]

    def ledger(self, key_id: str) -> list[dict[str, Any]]:
        with self.client(ADMIN_TOKEN) as admin:
            response = admin.get("/admin/ledger", params={"key_id": key_id})
        assert response.status_code == 200, response.text
        return [json.loads(line) for line in response.text.splitlines() if line.strip()]

    def usage(self, key: str) -> dict[str, Any]:
        with self.client(key) as client:
            response = client.get("/v1/usage")
        assert response.status_code == 200, response.text
        return dict(response.json())

    def quiet(self, key: str) -> dict[str, Any]:
        """The key's usage once nothing is held or in flight any more (bounded wait)."""
        for _ in range(300):
            usage = self.usage(key)
            if usage["held_usd"] == "0.000000" and usage["in_flight"] == 0:
                return usage
            time.sleep(0.05)
        raise AssertionError(f"holds never resolved: {usage}")

    def python(self, key: str, script: str, **env: str) -> Any:
        """Run ``script`` with fal-client pointed at this gateway; returns its JSON stdout."""
        full_env = {
            **os.environ,
            "FAL_KEY": key,
            "FAL_RUN_HOST": f"{self.address}/fal/run",
            "FAL_QUEUE_RUN_HOST": f"{self.address}/fal/queue",
            "SSL_CERT_FILE": str(self.ca_file),
            **env,
        }
        result = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(script)],
            env=full_env,
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert result.returncode == 0, result.stderr[-4000:]
        return json.loads(result.stdout.strip().splitlines()[-1])

    def js(self, key: str, scenario: str, **env: str) -> Any:
        """Run one scenario of ``js/scenarios.mjs`` (@fal-ai/client through ``proxyUrl``)."""
        node = shutil.which("node")
        assert node is not None, "node is required for the @fal-ai/client tests"
        full_env = {
            **os.environ,
            "FAL_KEY": key,
            "FALGATE_PROXY_URL": f"{self.url}/fal/proxy",
            "NODE_EXTRA_CA_CERTS": str(self.ca_file),
            **env,
        }
        result = subprocess.run(
            [node, "scenarios.mjs", scenario],
            cwd=JS_DIR,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert result.returncode == 0, result.stderr[-4000:]
        return json.loads(result.stdout.strip().splitlines()[-1])


def unit_price(entry: dict[str, Any]) -> int:
    if entry["operation"] == "transform":
        return CATALOG.transform_unit_price
    if entry["operation"] == "upscale":
        return CATALOG.upscale_unit_price
    return CATALOG.model(entry["model"]).unit_price


def assert_billed_as_produced(gateway: TlsGateway, key_id: str, key: str) -> list[dict[str, Any]]:
    """Every hold of the key is resolved, and each settle is exactly what the sandbox produced
    for that fal request (w x h x unit price, rounded up once); failed work is released.

    Returns the key's settle entries.
    """
    gateway.quiet(key)
    ledger = gateway.ledger(key_id)
    produced = {r["request_id"]: r for r in gateway.sandbox.requests()}
    holds = [e for e in ledger if e["event"] == "hold"]
    resolved = {e["request_id"]: e for e in ledger if e["event"] in ("settle", "release")}
    assert {h["request_id"] for h in holds} == set(resolved), ledger
    settles = []
    for entry in resolved.values():
        fal = produced.get(entry["upstream_request_id"] or "")
        if entry["event"] == "release":
            assert fal is None or fal["status"] != "completed", (entry, fal)
            continue
        assert fal is not None and fal["status"] == "completed", (entry, fal)
        expected = -(-fal["pixels"] * unit_price(entry) // 1_000_000)
        assert entry["amount_micro"] == expected, (entry, fal)
        settles.append(entry)
    usage = gateway.usage(key)
    assert usage["spent_usd"] == f"{sum(e['amount_micro'] for e in settles) / 1_000_000:.6f}"
    return settles


@pytest.fixture(scope="session")
def tls_gateway(
    tmp_path_factory: pytest.TempPathFactory,
    redis_url: str,
    sandbox: Sandbox,
    ledger_database_url: str,
) -> Iterator[TlsGateway]:
    """``falgate serve`` with ``FALGATE_TLS_SELF_SIGNED=true``: the CA it prints is trusted."""
    data_dir = tmp_path_factory.mktemp("falapi-gateway")
    port = free_port()
    env = gateway_env(
        port=port,
        data_dir=data_dir,
        redis_url=redis_url,
        sandbox_url=sandbox.url,
        ledger_url=ledger_database_url,  # the one archive of this Redis
        FALGATE_TLS_SELF_SIGNED="true",
    )
    proc, log = spawn_gateway(env, data_dir)
    ca_file = data_dir / "tls" / "ca.pem"
    gateway = TlsGateway(f"localhost:{port}", ca_file, proc, log, sandbox)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            if ca_file.exists():
                try:
                    with gateway.client() as client:
                        if client.get("/healthz").status_code == 200:
                            break
                except (httpx.HTTPError, ssl.SSLError):
                    pass
            time.sleep(0.05)
        yield gateway
    finally:
        _stop(proc)


@pytest.fixture
def fal_sandbox(tls_gateway: TlsGateway) -> Iterator[Sandbox]:
    """The shared sandbox, reset, with a little latency so queue requests are seen pending."""
    tls_gateway.sandbox.reset()
    tls_gateway.sandbox.configure(latency_ms=150)
    yield tls_gateway.sandbox
    tls_gateway.sandbox.reset()
