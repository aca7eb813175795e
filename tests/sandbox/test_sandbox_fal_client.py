"""The official ``fal-client`` package works against the sandbox over TLS.

fal_client reads ``FAL_RUN_HOST``/``FAL_QUEUE_RUN_HOST`` at import time and only speaks https,
so the sandbox runs as its own process with a certificate from a throwaway CA (trustme) and
the client runs in a subprocess with ``SSL_CERT_FILE`` pointing at that CA.
"""

from __future__ import annotations

import json
import os
import socket
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
import trustme

ROOT = Path(__file__).resolve().parents[2]
BIG_SEED = 2**64 - 3


@dataclass
class TlsSandbox:
    host: str  # host:port, as fal_client wants it
    ca_file: Path

    def control(self, method: str, path: str, **kwargs: Any) -> Any:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        with httpx.Client(base_url=f"https://{self.host}", verify=context, timeout=10) as c:
            response = c.request(method, path, **kwargs)
        response.raise_for_status()
        return response.json()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def tls_sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsSandbox]:
    tmp = tmp_path_factory.mktemp("tls-sandbox")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca_file, cert_file, key_file = tmp / "ca.pem", tmp / "cert.pem", tmp / "key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert.private_key_pem.write_to_path(str(key_file))
    cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))

    port = _free_port()
    log = tmp / "sandbox.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "app.sandbox",
                "--port",
                str(port),
                "--latency-ms",
                "20",
                "--ssl-certfile",
                str(cert_file),
                "--ssl-keyfile",
                str(key_file),
                "--log-level",
                "warning",
            ],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    box = TlsSandbox(host=f"127.0.0.1:{port}", ca_file=ca_file)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                box.control("GET", "/_sandbox/requests")
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
        yield box
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def _run_fal_client(box: TlsSandbox, script: str) -> Any:
    env = {
        **os.environ,
        "FAL_RUN_HOST": box.host,
        "FAL_QUEUE_RUN_HOST": f"{box.host}/queue",
        "SSL_CERT_FILE": str(box.ca_file),
        "FAL_KEY": "test:secret",
    }
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_run_submit_status_result(tls_sandbox: TlsSandbox) -> None:
    tls_sandbox.control("POST", "/_sandbox/reset")
    out = _run_fal_client(
        tls_sandbox,
        f"""
        import json
        import fal_client

        out = {{}}
        out["run"] = fal_client.run(
            "fal-ai/flux/dev",
            arguments={{"prompt": "a fox", "image_size": "square", "seed": {BIG_SEED}}},
        )
        handle = fal_client.submit(
            "fal-ai/flux/schnell", arguments={{"prompt": "x", "output_format": "png"}}
        )
        out["request_id"] = handle.request_id
        out["urls"] = [handle.status_url, handle.response_url, handle.cancel_url]
        out["status"] = type(fal_client.status(
            "fal-ai/flux/schnell", handle.request_id, with_logs=True
        )).__name__
        out["get"] = handle.get()
        final = handle.status(with_logs=True)
        out["final"] = [type(final).__name__, bool(final.logs)]
        out["result"] = fal_client.result("fal-ai/flux/schnell", handle.request_id)
        updates = []
        out["subscribe"] = fal_client.subscribe(
            "fal-ai/fast-sdxl",
            arguments={{"prompt": "x", "format": "png", "image_size": "square"}},
            with_logs=True,
            on_queue_update=lambda update: updates.append(type(update).__name__),
        )
        out["updates"] = updates
        try:
            fal_client.run("fal-ai/flux/dev", arguments={{"num_images": 9}})
        except fal_client.FalClientHTTPError as exc:
            out["error"] = [exc.status_code, exc.message]
        print(json.dumps(out))
        """,
    )
    assert out["run"]["seed"] == BIG_SEED
    assert out["run"]["images"][0]["width"] == 512
    assert out["run"]["images"][0]["url"].startswith(f"https://{tls_sandbox.host}/files/")

    rid = out["request_id"]
    base = f"https://{tls_sandbox.host}/queue/fal-ai/flux/requests/{rid}"
    assert out["urls"] == [base + "/status", base, base + "/cancel"]
    assert out["status"] in ("Queued", "InProgress", "Completed")
    assert out["final"] == ["Completed", True]
    assert out["get"] == out["result"]
    assert out["get"]["images"][0]["content_type"] == "image/png"
    assert out["subscribe"]["images"][0]["width"] == 512
    assert out["updates"] and out["updates"][-1] == "Completed"
    status, detail = out["error"]
    assert status == 422
    assert {tuple(d["loc"]) for d in detail} == {("body", "prompt"), ("body", "num_images")}

    ledger = tls_sandbox.control("GET", "/_sandbox/requests")["requests"]
    assert [e["status"] for e in ledger] == ["completed"] * 3


def test_cancel(tls_sandbox: TlsSandbox) -> None:
    tls_sandbox.control("POST", "/_sandbox/reset")
    tls_sandbox.control(
        "POST", "/_sandbox/faults", json={"kind": "hang", "scope": "job", "count": 1}
    )
    out = _run_fal_client(
        tls_sandbox,
        """
        import json, time
        import fal_client

        handle = fal_client.submit("fal-ai/flux-pro/v1.1", arguments={"prompt": "x"})
        fal_client.cancel("fal-ai/flux-pro/v1.1", handle.request_id)
        for _ in range(100):
            status = handle.status()
            if isinstance(status, fal_client.Completed):
                break
            time.sleep(0.05)
        print(json.dumps({"id": handle.request_id, "status": type(status).__name__,
                          "error": status.error}))
        """,
    )
    assert out["status"] == "Completed" and out["error"]
    entry = tls_sandbox.control("GET", f"/_sandbox/requests/{out['id']}")
    assert entry["status"] == "cancelled"
    assert entry["endpoint"] == "fal-ai/flux-pro/v1.1"
