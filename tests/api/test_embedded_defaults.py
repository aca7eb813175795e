"""``falgate serve`` with nothing configured: private Redis, embedded sandbox, printed secrets."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from app.redis import free_port
from tests.conftest import _wait_http, redis_answers


def test_serve_with_embedded_defaults(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FALGATE_")}
    env.pop("FAL_KEY", None)
    env.update({"FALGATE_PORT": str(port), "FALGATE_SANDBOX_LATENCY_MS": "0"})
    log = tmp_path / "serve.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve"],
        cwd=tmp_path,  # the default data dir is ./.falgate
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{url}/healthz", proc, log)
        output = log.read_text()
        assert "SANDBOX MODE" in output
        data_dir = tmp_path / ".falgate"
        admin_token = (data_dir / "admin_token").read_text()
        dev_key = (data_dir / "dev_key").read_text()
        assert admin_token in output and dev_key in output
        assert re.fullmatch(r"fgk_[A-Za-z0-9_-]{43}", dev_key)
        assert (data_dir / "admin_token").stat().st_mode & 0o077 == 0
        redis_url = (data_dir / "redis.url").read_text()
        assert redis_url.startswith(f"unix://{data_dir.resolve()}/redis.sock?")  # its socket
        assert redis_answers(redis_url)
        assert httpx.get(f"{url}/readyz").status_code == 200

        headers = {"Authorization": f"Bearer {dev_key}"}
        response = httpx.post(f"{url}/v1/generate", json={"prompt": "x"}, headers=headers)
        assert response.status_code == 200, response.text
        image_url = response.json()["images"][0]["url"]
        upscaled = httpx.post(
            f"{url}/v1/upscale", json={"image_url": image_url}, headers=headers, timeout=30
        )
        assert upscaled.status_code == 200, upscaled.text
        admin = {"Authorization": f"Bearer {admin_token}"}
        assert httpx.get(f"{url}/admin/keys", headers=admin).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while redis_answers(redis_url) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not redis_answers(redis_url), "the private Redis server outlived the gateway"
    assert (tmp_path / ".falgate" / "appendonly.aof").exists() or any(
        (tmp_path / ".falgate").glob("appendonly*")
    )


def test_sandbox_public_url_names_the_image_files(tmp_path: Path) -> None:
    port, sandbox_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FALGATE_")}
    env.pop("FAL_KEY", None)
    env.update(
        {
            "FALGATE_PORT": str(port),
            "FALGATE_SANDBOX_LATENCY_MS": "0",
            "FALGATE_SANDBOX_PORT": str(sandbox_port),
            "FALGATE_SANDBOX_PUBLIC_URL": f"http://localhost:{sandbox_port}",
            "FALGATE_ADMIN_TOKEN": "",  # empty counts as unset, as compose passes it
        }
    )
    log = tmp_path / "serve.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve"],
        cwd=tmp_path,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{url}/healthz", proc, log)
        dev_key = (tmp_path / ".falgate" / "dev_key").read_text()
        assert (tmp_path / ".falgate" / "admin_token").read_text() in log.read_text()
        headers = {"Authorization": f"Bearer {dev_key}"}
        response = httpx.post(f"{url}/v1/generate", json={"prompt": "x"}, headers=headers)
        image_url = response.json()["images"][0]["url"]
        assert image_url.startswith(f"http://localhost:{sandbox_port}/files/")
        assert httpx.get(image_url).status_code == 200
        upscaled = httpx.post(
            f"{url}/v1/upscale", json={"image_url": image_url}, headers=headers, timeout=30
        )
        assert upscaled.status_code == 200, upscaled.text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
