"""The dashboard's HTTP-level guarantees: security headers and cookie flags, also over TLS."""

from __future__ import annotations

import os
import re
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trustme

from app.redis import EmbeddedRedis, free_port
from tests.conftest import ADMIN_TOKEN, ROOT, Gateway, Sandbox, _stop


def _sign_in(client: httpx.Client, token: str) -> httpx.Response:
    page = client.get("/dashboard/login")
    assert page.status_code == 200
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert csrf is not None
    return client.post("/dashboard/login", data={"token": token, "csrf_token": csrf.group(1)})


def _cookie_flags(response: httpx.Response, name: str) -> set[str]:
    for header in response.headers.get_list("set-cookie"):
        if header.startswith(name + "="):
            return {part.strip().lower() for part in header.split(";")[1:]}
    raise AssertionError(f"no {name} cookie in {response.headers.get_list('set-cookie')}")


def test_pages_send_strict_security_headers(dashboard_gateway: Gateway) -> None:
    with httpx.Client(base_url=dashboard_gateway.url) as client:
        page = client.get("/dashboard/login")
        csp = page.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp
        assert "frame-ancestors 'none'" in csp
        assert page.headers["x-frame-options"] == "DENY"
        assert page.headers["cache-control"] == "no-store"
        assert page.headers["content-type"].startswith("text/html")
        # Over plain HTTP the cookies cannot be Secure, but are HttpOnly and SameSite=Strict.
        flags = _cookie_flags(page, "falgate_dashboard_login")
        assert {"httponly", "samesite=strict"} <= flags and "secure" not in flags
        signed_in = _sign_in(client, ADMIN_TOKEN)
        assert signed_in.status_code == 303
        flags = _cookie_flags(signed_in, "falgate_dashboard")
        assert {"httponly", "samesite=strict", "path=/dashboard"} <= flags
        assert ADMIN_TOKEN not in signed_in.headers.get("set-cookie", "")
        # Assets come from the gateway itself; anything else under /static is a 404 envelope.
        assert client.get("/dashboard/static/dashboard.css").status_code == 200
        missing = client.get("/dashboard/static/..%2Fsessions.py")
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found"
        # Bad query values are a 400 envelope, not a 500.
        bad = client.get("/dashboard/overview?days=7")
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "days"
        bad = client.get("/dashboard/keys?sort=secret")
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "sort"


@pytest.fixture(scope="module")
def tls_gateway(
    tmp_path_factory: pytest.TempPathFactory, sandbox: Sandbox
) -> Iterator[tuple[str, Path]]:
    tmp = tmp_path_factory.mktemp("dashboard-tls")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ca_file, cert_file, key_file = tmp / "ca.pem", tmp / "cert.pem", tmp / "key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert.private_key_pem.write_to_path(str(key_file))
    cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    (tmp / "redis").mkdir()
    redis = EmbeddedRedis(tmp / "redis", persist=False)
    redis.start()
    port = free_port()
    env = {
        **os.environ,
        "FALGATE_DATA_DIR": str(tmp / "data"),
        "FALGATE_REDIS_URL": redis.url,
        "FALGATE_SANDBOX_URL": sandbox.url,
        "FALGATE_ADMIN_TOKEN": ADMIN_TOKEN,
    }
    log = tmp / "gateway.log"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "app.main:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--ssl-certfile",
            str(cert_file),
            "--ssl-keyfile",
            str(key_file),
        ],
        cwd=ROOT,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"https://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, log.read_text()[-4000:]
            try:
                if (
                    httpx.get(
                        f"{url}/healthz",
                        verify=ssl.create_default_context(cafile=str(ca_file)),
                        timeout=1,
                    ).status_code
                    == 200
                ):
                    break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, log.read_text()[-4000:]
                time.sleep(0.1)
        yield url, ca_file
    finally:
        _stop(proc)
        redis.stop()


def test_cookies_are_secure_over_tls(tls_gateway: tuple[str, Path]) -> None:
    url, ca_file = tls_gateway
    with httpx.Client(
        base_url=url, verify=ssl.create_default_context(cafile=str(ca_file))
    ) as client:
        page = client.get("/dashboard/login")
        assert "secure" in _cookie_flags(page, "falgate_dashboard_login")
        signed_in = _sign_in(client, ADMIN_TOKEN)
        assert signed_in.status_code == 303
        flags = _cookie_flags(signed_in, "falgate_dashboard")
        assert {"secure", "httponly", "samesite=strict"} <= flags
        overview = client.get("/dashboard/overview")
        assert overview.status_code == 200 and 'id="spend-today"' in overview.text
