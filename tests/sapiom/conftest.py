"""The official Sapiom SDK under node, installed from the committed lockfile by the test itself."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

JS_DIR = Path(__file__).resolve().parent / "js"


@dataclass(frozen=True)
class NodeRunner:
    node: str

    def run(self, script: str, *args: str, timeout_s: float = 90) -> dict[str, Any]:
        """Run ``js/<script>`` and return the JSON object it prints (its stderr alongside)."""
        result = subprocess.run(
            [self.node, script, *args],
            cwd=JS_DIR,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        assert result.returncode == 0, f"{script} failed:\n{result.stdout}\n{result.stderr}"
        lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
        assert lines, f"{script} printed no result:\n{result.stdout}\n{result.stderr}"
        out: dict[str, Any] = json.loads(lines[-1])
        out["stderr"] = result.stderr
        return out


@pytest.fixture(scope="session")
def sapiom_node() -> NodeRunner:
    """node with ``@sapiom/fetch`` installed by ``npm ci`` from tests/sapiom/js/package-lock.json.

    Missing node/npm fails under CI (which has both); elsewhere the SDK tests are skipped.
    """
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        message = "node and npm are needed to run the official Sapiom SDK"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    result = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=JS_DIR,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, f"npm ci failed:\n{result.stdout}\n{result.stderr}"
    return NodeRunner(node)
