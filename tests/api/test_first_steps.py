"""A new user's first steps, against a real ``falgate serve`` with nothing configured.

The README's shell examples are run as printed, the CLI is run the way a user runs it (in the
gateway's directory, elsewhere, piped into a reader that goes away), and what the gateway
leaves on disk is checked: private files, sandbox images that survive a restart.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from app.redis import free_port
from tests.conftest import ROOT, _wait_http

BIN = Path(sys.executable).parent  # the venv's bin: python, falgate, ...


@dataclass
class Served:
    cwd: Path
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def data_dir(self) -> Path:
        return self.cwd / ".falgate"

    @property
    def key(self) -> str:
        return (self.data_dir / "dev_key").read_text()

    @property
    def admin_token(self) -> str:
        return (self.data_dir / "admin_token").read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)


def _user_env(**extra: str) -> dict[str, str]:
    """The environment of a user who configured nothing (the venv's bin on PATH)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FALGATE_")}
    env.pop("FAL_KEY", None)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def _serve(cwd: Path, port: int) -> Served:
    log = cwd / f"serve-{len(list(cwd.glob('serve-*.log')))}.log"
    proc = subprocess.Popen(
        [str(BIN / "falgate"), "serve"],
        cwd=cwd,
        env=_user_env(FALGATE_PORT=str(port), FALGATE_SANDBOX_LATENCY_MS="0"),
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    served = Served(cwd=cwd, port=port, proc=proc, log=log)
    _wait_http(f"{served.url}/readyz", proc, log)
    return served


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    gateway = _serve(tmp_path_factory.mktemp("first-steps"), free_port())
    yield gateway
    gateway.stop()


def _run(cmd: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", cmd],
        cwd=cwd,
        env=_user_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def readme_commands() -> tuple[dict[str, str], list[str]]:
    """The variables set and the ``curl``/``falgate`` commands of the README's ``sh`` blocks,
    continuation lines joined and trailing comments dropped."""
    readme = (ROOT / "README.md").read_text()
    variables: dict[str, str] = {}
    commands: list[str] = []
    for block in re.findall(r"```sh\n(.*?)```", readme, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            assignment = re.fullmatch(r"([A-Z_]+)=(\S+)", line)
            if assignment:
                variables[assignment[1]] = assignment[2]
            elif line.startswith(("curl ", "falgate ")):
                commands.append(line)
    return variables, commands


def test_the_readme_examples_run_as_printed(served: Served) -> None:
    variables, commands = readme_commands()
    assert variables.get("KEY") == "fgk_..."  # the placeholder the user replaces
    curls = [c for c in commands if c.startswith("curl ")]
    clis = [c for c in commands if c.startswith("falgate ")]
    assert len(curls) >= 3 and len(clis) >= 4, commands
    assert any("/price" in c for c in curls)
    for command in commands:
        # The printed key, and this gateway's port instead of the default 8000.
        runnable = command.replace("localhost:8000", f"127.0.0.1:{served.port}")
        result = _run(runnable, served.cwd, KEY=served.key)
        assert result.returncode == 0, (command, result.stdout, result.stderr)
        assert result.stdout.strip(), (command, result.stderr)
        if command.startswith("curl "):
            body = json.loads(result.stdout)
            assert "error" not in body, (command, body)
        elif "--format csv" in command:
            assert result.stdout.splitlines()[0].count(",") >= 5, result.stdout
        elif "ledger" not in command:
            json.loads(result.stdout)


def test_a_body_without_content_type_is_a_400_that_names_the_header(served: Served) -> None:
    headers = {"Authorization": f"Bearer {served.key}"}
    for content_type in (None, "application/x-www-form-urlencoded", "text/plain"):
        sent = dict(headers, **({"Content-Type": content_type} if content_type else {}))
        response = httpx.post(
            f"{served.url}/v1/generate/price", content=b'{"prompt": "x"}', headers=sent
        )
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["type"] == "invalid_request"
        assert "Content-Type: application/json" in error["message"], error


def test_the_cli_without_a_running_gateway_fails_clearly(served: Served, tmp_path: Path) -> None:
    elsewhere = _run("falgate keys list", tmp_path)
    assert elsewhere.returncode == 1, elsewhere
    assert "no running gateway" in elsewhere.stderr
    assert "Traceback" not in elsewhere.stderr
    assert not (tmp_path / ".falgate").exists()  # no new, empty Redis was started

    stale = tmp_path / "stale" / ".falgate"
    stale.mkdir(parents=True)
    (stale / "redis.url").write_text(f"redis://:x@127.0.0.1:{free_port()}/0")
    gone = _run("falgate usage", stale.parent)
    assert gone.returncode == 1, gone
    assert "does not answer" in gone.stderr and "Traceback" not in gone.stderr

    here = _run("falgate keys list", served.cwd)
    assert here.returncode == 0, here.stderr
    assert any(k["name"] == "development" for k in json.loads(here.stdout))


def test_the_cli_stops_quietly_when_its_reader_goes_away(served: Served) -> None:
    proc = subprocess.Popen(
        [str(BIN / "falgate"), "usage", "ledger", "--format", "csv"],
        cwd=served.cwd,
        env=_user_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # like `head` having read enough, before anything was written
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141, stderr
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr

    piped = _run("falgate keys list | head -n 1", served.cwd)
    assert piped.returncode == 0 and "Traceback" not in piped.stderr, piped.stderr


def _generate(served: Served) -> str:
    response = httpx.post(
        f"{served.url}/v1/generate",
        json={"prompt": "a fox", "image_size": {"width": 64, "height": 64}},
        headers={"Authorization": f"Bearer {served.key}"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    return str(response.json()["images"][0]["url"])


def test_the_image_allow_list_covers_the_sandbox_file_route_only(served: Served) -> None:
    image_url = _generate(served)
    sandbox = image_url.split("/files/")[0]
    headers = {"Authorization": f"Bearer {served.key}"}

    def price(url: str) -> httpx.Response:
        return httpx.post(
            f"{served.url}/v1/upscale/price", json={"image_url": url}, headers=headers, timeout=60
        )

    assert price(image_url).status_code == 200, price(image_url).text
    for refused in (
        f"{sandbox}/_sandbox/requests",
        f"{sandbox}/_sandbox/config",
        f"{sandbox}/files/../_sandbox/requests",
        f"{sandbox}/files/%2e%2e/_sandbox/requests",
        f"{sandbox}/fal-ai/flux/dev",
    ):
        response = price(refused)
        assert response.status_code == 400, (refused, response.text)
        error = response.json()["error"]
        assert error["param"] == "image_url"
        assert "private" in error["message"] or "fetch" in error["message"], (refused, error)


def test_every_data_dir_file_is_private(served: Served) -> None:
    _generate(served)  # a sandbox file on disk too
    data_dir = served.data_dir
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    names = set()
    for path in data_dir.rglob("*"):
        mode = stat.S_IMODE(path.stat().st_mode)
        names.add(path.name)
        if path.is_dir():
            assert mode == 0o700, (path, oct(mode))
        else:
            assert mode & 0o077 == 0, (path, oct(mode))
    assert {"appendonly.aof", "redis.log", "admin_token", "dev_key", "redis.url"} <= names
    # The embedded Redis is reached over its socket (mode 700, checked above with the files).
    assert "redis.sock" in names
    assert (data_dir / "redis.url").read_text().startswith("unix://")
    assert any(n.endswith(".jpg") for n in names), names


def test_docs_work_offline(served: Served) -> None:
    """Every asset /docs and /redoc load comes from the gateway itself: no CDN."""
    for page in ("/docs", "/redoc"):
        html = httpx.get(f"{served.url}{page}", timeout=30)
        assert html.status_code == 200
        assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html.text)
        assert len(assets) >= 2, html.text
        for asset in assets:
            assert asset.startswith("/"), f"{page} loads {asset} from elsewhere"
            response = httpx.get(served.url + asset, timeout=30)
            assert response.status_code == 200, asset
            assert len(response.content) > 1000, asset
        assert not re.search(r"https?://", html.text), html.text
    assert "openapi" in httpx.get(f"{served.url}/openapi.json", timeout=30).json()


def test_sandbox_images_survive_a_restart(served: Served) -> None:
    """Last in this module: it restarts the gateway."""
    image_url = _generate(served)
    before = httpx.get(image_url, timeout=30)
    assert before.status_code == 200
    served.stop()
    again = _serve(served.cwd, served.port)
    try:
        after = httpx.get(image_url, timeout=30)
        assert after.status_code == 200, after.text
        assert after.headers["content-type"] == "image/jpeg"
        assert after.content == before.content
    finally:
        again.stop()


def test_every_setting_is_in_the_readme_settings_table() -> None:
    from app.settings import Settings

    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Settings", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `FALGATE_")]
    documented = {name for row in rows for name in re.findall(r"`(FALGATE_[A-Z0-9_]+)`", row)}
    wanted = {f"FALGATE_{name.upper()}" for name in Settings.model_fields}
    assert not wanted - documented, f"settings missing from the README: {wanted - documented}"
    assert not documented - wanted - {"FALGATE_FAL_KEY"}, documented - wanted
