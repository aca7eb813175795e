"""The official JS ``@fal-ai/client``, unchanged, against ``falgate serve`` over TLS.

The client is configured as the README says (``credentials`` = a falgate key, ``proxyUrl``
with ``when: "always"``), so every call goes to ``/fal/proxy`` with ``x-fal-target-url``.
The package is installed by ``npm ci`` from the committed lockfile in ``js/``.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.conftest import Sandbox
from tests.falapi.conftest import JS_DIR, TlsGateway, assert_billed_as_produced


@pytest.fixture(scope="module", autouse=True)
def fal_js_client() -> None:
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        message = "node and npm are needed for the @fal-ai/client tests"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    installed = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=JS_DIR,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stderr[-4000:]


def test_run(tls_gateway: TlsGateway, fal_sandbox: Sandbox) -> None:
    key_id, key = tls_gateway.create_key()
    out = tls_gateway.js(key, "run")
    data, request_id = out["ok"]["data"], out["ok"]["requestId"]
    assert data["images"][0]["width"] == 512 and data["seed"] == 42
    (settle,) = assert_billed_as_produced(tls_gateway, key_id, key)
    assert request_id == settle["request_id"]


def test_subscribe(tls_gateway: TlsGateway, fal_sandbox: Sandbox) -> None:
    key_id, key = tls_gateway.create_key()
    out = tls_gateway.js(key, "subscribe")
    assert out["ok"]["data"]["images"][0]["content_type"] == "image/png"
    assert out["updates"][-1] == "COMPLETED"
    (settle,) = assert_billed_as_produced(tls_gateway, key_id, key)
    assert out["ok"]["requestId"] == settle["request_id"]


def test_queue_submit_status_result(tls_gateway: TlsGateway, fal_sandbox: Sandbox) -> None:
    key_id, key = tls_gateway.create_key()
    out = tls_gateway.js(key, "queue")
    submitted = out["submitted"]
    assert submitted["status"] == "IN_QUEUE" and "queue_position" in submitted
    assert submitted["status_url"].startswith(f"{tls_gateway.url}/fal/queue/fal-ai/flux/requests/")
    assert out["first"]["status"] in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")
    assert "logs" in out["first"]
    assert out["status"]["status"] == "COMPLETED"
    assert out["result"]["requestId"] == submitted["request_id"]
    assert out["result"]["data"]["images"][0]["width"] == 512
    (settle,) = assert_billed_as_produced(tls_gateway, key_id, key)
    assert settle["request_id"] == submitted["request_id"]


def test_queue_cancel(tls_gateway: TlsGateway, fal_sandbox: Sandbox) -> None:
    fal_sandbox.configure(latency_ms=5000)
    key_id, key = tls_gateway.create_key()
    out = tls_gateway.js(key, "cancel")
    assert "error" not in out["cancelled"], out["cancelled"]
    assert out["status"]["status"] == "COMPLETED" and out["status"]["error"]
    (produced,) = fal_sandbox.requests()
    assert produced["status"] == "cancelled"
    assert assert_billed_as_produced(tls_gateway, key_id, key) == []


def test_validation_error_and_foreign_ids(tls_gateway: TlsGateway, fal_sandbox: Sandbox) -> None:
    key_id, key = tls_gateway.create_key()
    invalid = tls_gateway.js(key, "invalid")["error"]
    assert invalid["class"] == "ValidationError" and invalid["status"] == 422
    assert {tuple(e["loc"]) for e in invalid["fieldErrors"]} == {
        ("body", "prompt"),
        ("body", "num_images"),
    }
    _, other = tls_gateway.create_key()
    with tls_gateway.client(other) as client:
        rid = client.post("/fal/queue/fal-ai/flux/dev", json={"prompt": "x"}).json()["request_id"]
    foreign = tls_gateway.js(key, "foreign", FOREIGN_REQUEST_ID=rid)
    assert {name: call["error"]["status"] for name, call in foreign.items()} == {
        "status": 404,
        "result": 404,
        "cancel": 404,
    }
    assert assert_billed_as_produced(tls_gateway, key_id, key) == []
