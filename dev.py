#!/usr/bin/env python3
"""The README's two commands: ``python3 dev.py serve`` and ``python3 dev.py test``.

Each creates (or refreshes, when pyproject.toml changed) the virtual environment in ``.venv``
and then runs the gateway, or every check and test. Needs only Python 3.11+.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / ".falgate-installed"


def ensure_venv() -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - this file runs before the venv exists
        sys.exit("falgate needs Python 3.11 or newer")
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == wanted and (BIN / "falgate").exists():
        return
    if not (BIN / "python").exists():
        print("creating .venv ...", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    print("installing falgate and its test tools into .venv ...", flush=True)
    pip = [str(BIN / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "-e", f"{ROOT}[test]"], check=True)
    STAMP.write_text(wanted)


# Programs the tests run besides Python's: docker-compose checks the compose file (no engine
# needed), curl runs the README's examples, nginx is the benchmark's fixed-reply upstream (its
# smoke test). Installed from Debian's packages when missing.
SYSTEM_TOOLS = {"docker-compose": "docker-compose", "curl": "curl", "nginx": "nginx-light"}


def _installed(tool: str) -> bool:
    # Debian puts nginx in /usr/sbin, which a non-root PATH may not include.
    return shutil.which(tool) is not None or os.access(f"/usr/sbin/{tool}", os.X_OK)


def ensure_system_tools() -> None:
    missing = [pkg for tool, pkg in SYSTEM_TOOLS.items() if not _installed(tool)]
    if not missing:
        return
    if shutil.which("apt-get") is None:
        sys.exit(f"the tests need {', '.join(missing)}: install them and run again")
    print(f"installing {', '.join(missing)} with apt-get ...", flush=True)
    subprocess.run(["apt-get", "update", "-qq"], check=False, stdout=subprocess.DEVNULL)
    result = subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=False)
    if result.returncode != 0:
        sys.exit(f"could not install {', '.join(missing)} (apt-get install failed)")


def run(*cmd: str) -> None:
    print("+", " ".join(cmd), flush=True)
    result = subprocess.run(cmd, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(result.returncode)


def main() -> None:
    command = sys.argv[1] if len(sys.argv) > 1 else "help"
    rest = sys.argv[2:]
    if command == "serve":
        ensure_venv()
        os.chdir(ROOT)
        os.execv(str(BIN / "falgate"), [str(BIN / "falgate"), "serve", *rest])
    elif command == "test":
        ensure_venv()
        ensure_system_tools()
        paths = [p for p in ("app", "tests", "bench", "dev.py") if (ROOT / p).exists()]
        run(str(BIN / "ruff"), "check", *paths)
        run(str(BIN / "ruff"), "format", "--check", *paths)
        run(str(BIN / "mypy"))
        run(str(BIN / "python"), "-m", "pytest", *rest)
    else:
        sys.exit("usage: python3 dev.py serve|test [args...]")


if __name__ == "__main__":
    main()
