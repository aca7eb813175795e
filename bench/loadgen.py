"""Load generators for the benchmark: ``wrk`` when installed, else a Python asyncio/httpx one.

Both are closed-loop: ``concurrency`` connections, each sending the next request as soon as the
previous answer arrived, for a fixed time (or, for the Python one, a fixed count). Both return a
:class:`LoadResult` with the same fields, so a result says which tool measured it.

The Python generator exists so the benchmark runs where wrk is missing (``apt-get install wrk``
on Debian/Ubuntu). It spends far more CPU per request than wrk, on the same two cores as the
servers it measures, so its absolute numbers are lower and its latencies include its own
overhead; its ratios are still measured in the same conditions for every target.

Run alone: ``python bench/loadgen.py URL --concurrency 16 --duration 5 [--tool python]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

WRK_SCRIPT = Path(__file__).resolve().parent / "wrk_post.lua"
WRK_INSTALL_HINT = "install wrk for faster, lower-overhead load: apt-get install -y wrk"


@dataclass
class LoadResult:
    """What one load run measured. Latencies in milliseconds, throughput in 2xx per second."""

    tool: str  # "wrk" or "python-httpx"
    url: str
    concurrency: int
    duration_s: float
    requests: int  # every completed response
    ok: int  # 2xx responses
    non_2xx: int
    socket_errors: int  # connect/read/write errors and timeouts
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def run_wrk(
    url: str, body: bytes, authorization: str | None, concurrency: int, duration_s: float
) -> LoadResult:
    """One ``wrk`` run (one thread: the machine's cores belong to the servers under test)."""
    seconds = max(1, round(duration_s))
    cmd = [
        "wrk",
        "-t1",
        f"-c{concurrency}",
        f"-d{seconds}s",
        "--timeout",
        "30s",
        "-s",
        str(WRK_SCRIPT),
        url,
    ]
    env = {
        **os.environ,
        "BENCH_BODY": body.decode(),
        "BENCH_AUTHORIZATION": authorization or "",
    }
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=seconds + 60)
    line = next(
        (ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_RESULT ")),
        None,
    )
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stdout}\n{proc.stderr}")
    data = json.loads(line.removeprefix("BENCH_RESULT "))
    duration = data["duration_us"] / 1e6
    requests = int(data["requests"])
    non_2xx = int(data["errors_status"])
    socket_errors = sum(
        int(data[f"errors_{kind}"]) for kind in ("connect", "read", "write", "timeout")
    )
    ok = requests - non_2xx
    return LoadResult(
        tool="wrk",
        url=url,
        concurrency=concurrency,
        duration_s=round(duration, 3),
        requests=requests,
        ok=ok,
        non_2xx=non_2xx,
        socket_errors=socket_errors,
        rps=round(ok / duration, 1) if duration else 0.0,
        p50_ms=data["p50_us"] / 1000,
        p90_ms=data["p90_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        mean_ms=round(data["mean_us"] / 1000, 3),
        max_ms=data["max_us"] / 1000,
    )


def _percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile (what wrk reports too)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


async def _python_load(
    url: str,
    body: bytes,
    authorization: str | None,
    concurrency: int,
    duration_s: float | None,
    total_requests: int | None,
) -> LoadResult:
    headers = {"Content-Type": "application/json"}
    if authorization:
        headers["Authorization"] = authorization
    latencies: list[float] = []
    statuses = {"ok": 0, "non_2xx": 0, "socket_errors": 0}
    budget = [total_requests if total_requests is not None else -1]
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(30.0)
    started = time.perf_counter()
    deadline = started + duration_s if duration_s is not None else math.inf

    async with httpx.AsyncClient(limits=limits, timeout=timeout, headers=headers) as client:

        async def worker() -> None:
            while time.perf_counter() < deadline:
                if budget[0] == 0:
                    return
                if budget[0] > 0:
                    budget[0] -= 1
                t0 = time.perf_counter()
                try:
                    response = await client.post(url, content=body)
                except httpx.HTTPError:
                    statuses["socket_errors"] += 1
                    continue
                latencies.append(time.perf_counter() - t0)
                if 200 <= response.status_code < 300:
                    statuses["ok"] += 1
                else:
                    statuses["non_2xx"] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    ms = [v * 1000 for v in latencies]
    return LoadResult(
        tool="python-httpx",
        url=url,
        concurrency=concurrency,
        duration_s=round(elapsed, 3),
        requests=len(latencies),
        ok=statuses["ok"],
        non_2xx=statuses["non_2xx"],
        socket_errors=statuses["socket_errors"],
        rps=round(statuses["ok"] / elapsed, 1) if elapsed else 0.0,
        p50_ms=round(_percentile(ms, 50), 3),
        p90_ms=round(_percentile(ms, 90), 3),
        p99_ms=round(_percentile(ms, 99), 3),
        mean_ms=round(sum(ms) / len(ms), 3) if ms else 0.0,
        max_ms=round(ms[-1], 3) if ms else 0.0,
    )


def run_python(
    url: str,
    body: bytes,
    authorization: str | None,
    concurrency: int,
    *,
    duration_s: float | None = None,
    requests: int | None = None,
) -> LoadResult:
    """The fallback generator, in its own process (so it never shares a GIL with its caller)."""
    if duration_s is None and requests is None:
        raise ValueError("give duration_s or requests")
    cmd = [sys.executable, str(Path(__file__).resolve()), url, "--tool", "python"]
    cmd += ["--concurrency", str(concurrency), "--body", body.decode()]
    if authorization:
        cmd += ["--authorization", authorization]
    if duration_s is not None:
        cmd += ["--duration", str(duration_s)]
    if requests is not None:
        cmd += ["--requests", str(requests)]
    limit = (duration_s or 0) + (requests or 0) / 50 + 120  # generous, but bounded
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
    if proc.returncode != 0:
        raise RuntimeError(f"python load generator failed: {proc.stderr}")
    return LoadResult(**json.loads(proc.stdout.strip().splitlines()[-1]))


def run_load(
    tool: str,
    url: str,
    body: bytes,
    authorization: str | None,
    concurrency: int,
    duration_s: float,
) -> LoadResult:
    """A timed run with ``tool`` (``wrk`` or ``python``)."""
    if tool == "wrk":
        return run_wrk(url, body, authorization, concurrency, duration_s)
    return run_python(url, body, authorization, concurrency, duration_s=duration_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("--tool", choices=["wrk", "python"], default=None)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--duration", type=float, default=None, help="seconds")
    parser.add_argument("--requests", type=int, default=None, help="stop after this many")
    parser.add_argument("--body", default='{"prompt": "benchmark"}')
    parser.add_argument("--authorization", default=None, help="Authorization header value")
    args = parser.parse_args(argv)
    if args.duration is None and args.requests is None:
        args.duration = 5.0
    tool = args.tool or ("wrk" if wrk_available() and args.requests is None else "python")
    body = args.body.encode()
    if tool == "wrk":
        result = run_wrk(args.url, body, args.authorization, args.concurrency, args.duration)
    else:
        with contextlib.suppress(ImportError):
            import uvloop

            uvloop.install()
        result = asyncio.run(
            _python_load(
                args.url,
                body,
                args.authorization,
                args.concurrency,
                args.duration,
                args.requests,
            )
        )
    print(json.dumps(result.to_json()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
