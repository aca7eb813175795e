"""JSON logs from a real uvicorn server: one access line per request, request ids, no secrets,
graceful shutdown that lets in-flight requests finish."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from ops_demo_app import ADMIN_TOKEN, FAL_KEY, GATEWAY_KEY, REDIS_PASSWORD

from app.ops.logging import JsonFormatter, secrets_of
from app.redis import free_port
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEMO = Path(__file__).with_name("ops_demo_app.py")


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def access(self) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line["logger"] == "falgate.access"]


def _start(tmp: Path, *args: str) -> Server:
    port = free_port()
    log = tmp / f"server-{port}.log"
    proc = subprocess.Popen(
        [sys.executable, str(DEMO), str(port), *args],
        cwd=ROOT,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(log.read_text())
        try:
            httpx.get(f"{url}/healthz", timeout=1)
            return Server(url, proc, log)
        except httpx.HTTPError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(log.read_text())


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = _start(tmp_path)
    yield srv
    srv.stop()


def test_every_line_is_json_and_each_request_logs_once(server: Server) -> None:
    headers = {"Authorization": f"Bearer {GATEWAY_KEY}", "X-Request-Id": "client-abc.123"}
    with httpx.Client(base_url=server.url) as client:
        ok = client.post("/v1/run/fal-ai/flux/dev", json={"prompt": "a red fox"}, headers=headers)
        missing = client.get("/v1/nope")
    server.stop()

    assert ok.status_code == 200
    # The client's id is echoed as its correlation id; the request's id is the gateway's own.
    assert ok.headers["x-client-request-id"] == "client-abc.123"
    assert ok.headers["x-request-id"].startswith("req_")
    assert missing.status_code == 404
    assert missing.headers["x-request-id"].startswith("req_")
    assert missing.json()["error"]["request_id"] == missing.headers["x-request-id"]

    lines = server.lines()  # json.loads succeeded on every line, uvicorn's own included
    assert all({"ts", "level", "logger", "msg"} <= line.keys() for line in lines)
    assert any(line["logger"].startswith("uvicorn") for line in lines)
    assert not any(line["logger"] == "uvicorn.access" for line in lines)

    # One access line per request (the readiness poll of the fixture included).
    access = server.access()
    run = [a for a in access if a["route"] == "/v1/run/{model_id}"]
    assert len(run) == 1
    assert run[0] | {"latency_ms": 0, "ts": "", "client": None} == run[0] | {
        "request_id": ok.headers["x-request-id"],
        "client_request_id": "client-abc.123",
        "method": "POST",
        "path": "/v1/run/fal-ai/flux/dev",
        "status": 200,
        "key_id": "key_demo",
        "model": "fal-ai/flux/dev",
        "cost_usd": "0.011797",
        "upstream_request_id": "fal-req-123",
        "latency_ms": 0,
        "ts": "",
        "client": None,
    }
    assert "prompt" not in run[0]  # FALGATE_LOG_PROMPTS is off
    unmatched = [a for a in access if a["path"] == "/v1/nope"]
    assert len(unmatched) == 1 and unmatched[0]["route"] == "<unmatched>"
    assert unmatched[0]["status"] == 404

    # Lines logged while serving a request carry its id.
    demo = [line for line in lines if line["logger"] == "falgate.demo" and "request_id" in line]
    assert demo and all(line["request_id"] == ok.headers["x-request-id"] for line in demo)


def test_no_secret_reaches_the_logs(server: Server) -> None:
    with httpx.Client(base_url=server.url) as client:
        client.post(
            "/v1/run/fal-ai/flux/dev",
            json={"prompt": "x"},
            headers={"Authorization": f"Key {GATEWAY_KEY}", "X-Request-Id": GATEWAY_KEY},
        )
        broken = client.get("/v1/broken", headers={"X-API-Key": GATEWAY_KEY})
    server.stop()
    assert broken.status_code == 500

    text = server.log.read_text()
    for secret in (FAL_KEY, ADMIN_TOKEN, REDIS_PASSWORD, GATEWAY_KEY, GATEWAY_KEY[4:]):
        assert secret not in text
    assert "[redacted]" in text
    # A request id that looks like a key is replaced, never echoed or logged.
    ids = {a["request_id"] for a in server.access()}
    assert all(rid.startswith("req_") for rid in ids)
    # The unexpected error is logged with its traceback, scrubbed.
    errors = [line for line in server.lines() if line["level"] == "error"]
    assert errors and "RuntimeError" in errors[0]["exc"]


def test_prompts_are_logged_only_when_enabled(tmp_path: Path) -> None:
    srv = _start(tmp_path, "--log-prompts")
    try:
        httpx.post(f"{srv.url}/v1/run/flux-dev", json={"prompt": "a blue whale"}, timeout=10)
    finally:
        srv.stop()
    run = [a for a in srv.access() if a["route"] == "/v1/run/{model_id}"]
    assert run[0]["prompt"] == "a blue whale"


def test_insane_request_ids_are_replaced(server: Server) -> None:
    for supplied in (b"", b"x" * 65, b"has space", b"semi;colon", "\u00fcn".encode(), b"-dash"):
        response = httpx.get(f"{server.url}/healthz", headers={b"X-Request-Id": supplied})
        assert response.headers["x-request-id"].startswith("req_"), supplied
        assert len(response.headers["x-request-id"]) == 36


def test_sigterm_lets_in_flight_requests_finish(server: Server) -> None:
    result: dict[str, Any] = {}

    def call() -> None:
        response = httpx.post(
            f"{server.url}/v1/run/flux-dev", json={"prompt": "slow", "sleep": 1.5}, timeout=20
        )
        result["status"] = response.status_code

    thread = threading.Thread(target=call)
    thread.start()
    deadline = time.monotonic() + 10
    while "falgate_inflight_requests 1.0" not in httpx.get(f"{server.url}/metrics").text:
        assert time.monotonic() < deadline, "the slow request never started"
        time.sleep(0.02)
    server.proc.send_signal(signal.SIGTERM)
    thread.join(timeout=20)
    server.proc.wait(timeout=20)

    assert result.get("status") == 200
    shutdown = [line for line in server.lines() if line["msg"] == "shutdown"]
    assert shutdown and shutdown[0]["drained"] is True


def test_redis_passwords_in_any_url_form_are_blanked() -> None:
    for url, secret in (
        ("redis://:pw-one-1@h:6379/0", "pw-one-1"),
        ("redis+cluster://user:pw%40two@a:7000,b:7001", "pw@two"),
        ("redis+sentinel://s1:26379/svc?sentinel_password=pw-three", "pw-three"),
        ("unix:///run/redis.sock?password=pw-four", "pw-four"),
    ):
        assert secret in secrets_of(Settings(_env_file=None, redis_url=url))


def test_scrubbing_blanks_credentials_but_not_prose() -> None:
    formatter = JsonFormatter(redact=["s3cret-admin-token"])
    cases = {
        "no fal key is set": "no fal key is set",
        "sent Key 0f3c-11aa:9d8e7f6a5b4c3d2e1f": "sent Key [redacted]",
        "Authorization: Bearer abcdefghijklmnop1234": "Authorization: Bearer [redacted]",
        "key fgk_abc is bad": "key fgk_[redacted] is bad",
        'token "s3cret-admin-token"': 'token "[redacted]"',
    }
    for message, expected in cases.items():
        record = logging.LogRecord("t", logging.INFO, __file__, 1, message, None, None)
        assert json.loads(formatter.format(record))["msg"] == expected
