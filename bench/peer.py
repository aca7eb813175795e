"""A peer gateway measured in the same run as falgate: ``bench/run.py --peer litellm``.

LiteLLM's proxy (1.108.x, the version the issue's numbers were taken with) is installed into a
virtual environment of its own under ``~/.cache/falgate-bench/`` (``FALGATE_BENCH_CACHE``
overrides it) the first time it is asked for, with pip from the package registry; it never
touches the project's ``.venv``. It is configured against the same sandbox, as falgate's
sandbox mode is: one ``fal_ai/fal-ai/flux/dev`` deployment whose ``api_base`` is the sandbox,
a master key, no database, and LiteLLM's own in-memory provider budget on ``fal_ai`` (the
closest it has to falgate's metering), answering OpenAI's ``POST /v1/images/generations``
with ``size: 64x64`` (LiteLLM maps it to fal's ``image_size`` object, so the sandbox draws the
same 64 x 64 image as for every other target).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from app.redis import free_port
from bench import stack

LITELLM_REQUIREMENT = "litellm[proxy]>=1.108,<1.109"
LITELLM_MASTER_KEY = "sk-falgate-bench-peer"
LITELLM_MODEL = "flux-dev"
PEERS = ("litellm",)


def cache_dir() -> Path:
    return Path(os.environ.get("FALGATE_BENCH_CACHE", Path.home() / ".cache" / "falgate-bench"))


def ensure_litellm(log: stack.Logger) -> Path:
    """The ``litellm`` command of the benchmark's own LiteLLM virtualenv (installed once)."""
    venv = cache_dir() / "litellm-1.108"
    command = venv / "bin" / "litellm"
    stamp = venv / ".falgate-bench-installed"
    if command.exists() and stamp.exists():
        return command
    log(f"installing {LITELLM_REQUIREMENT} into {venv} (once; a few minutes)")
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "--disable-pip-version-check", LITELLM_REQUIREMENT], check=True)
    stamp.write_text(LITELLM_REQUIREMENT + "\n")
    return command


def litellm_config(sandbox_url: str) -> dict[str, object]:
    return {
        "model_list": [
            {
                "model_name": LITELLM_MODEL,
                "litellm_params": {
                    "model": "fal_ai/fal-ai/flux/dev",
                    "api_base": sandbox_url,
                    "api_key": "sandbox",
                },
            }
        ],
        "router_settings": {
            "provider_budget_config": {"fal_ai": {"budget_limit": 1_000_000, "time_period": "30d"}}
        },
        "litellm_settings": {"drop_params": True, "telemetry": False},
        "general_settings": {"master_key": LITELLM_MASTER_KEY},
    }


def litellm_body(prompt: str) -> bytes:
    return json.dumps({"model": LITELLM_MODEL, "prompt": prompt, "size": "64x64"}).encode()


def start_litellm(workdir: Path, sandbox_url: str, log: stack.Logger) -> stack.Service:
    """LiteLLM's proxy on 127.0.0.1, one worker, against the sandbox."""
    command = ensure_litellm(log)
    data = workdir / "litellm"
    data.mkdir(parents=True, exist_ok=True)
    config = data / "config.json"  # YAML is a superset of JSON: LiteLLM reads it as is
    config.write_text(json.dumps(litellm_config(sandbox_url), indent=2))
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "LITELLM_"))},
        "LITELLM_LOG": "ERROR",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no fetch of the cost map at start
        "DISABLE_SCHEMA_UPDATE": "True",
        "NO_DOCS": "True",
    }
    args = [
        str(command),
        "--config",
        str(config),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num_workers",
        "1",
    ]
    proc, log_file = stack.spawn("litellm", args, data, env)
    url = f"http://127.0.0.1:{port}"
    stack.wait_http(f"{url}/health/liveliness", proc, log_file, timeout_s=180)
    return stack.Service("litellm", url, proc, log_file)
