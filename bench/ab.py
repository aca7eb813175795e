"""Is a change faster, slower, or neither? An interleaved A/B of two checkouts' gateways.

    .venv/bin/python bench/ab.py --base b6bb245                 # this checkout against a commit
    .venv/bin/python bench/ab.py --base ../other --mode queue --concurrency 1,16 --runs 8

Starts one sandbox (no simulated latency) and two ``falgate serve`` gateways, each with its own
Redis and key: **base** (``--base``: a directory, or a git revision checked out with ``git
worktree`` into a temporary directory) and **head** (this checkout). Both run on this
checkout's virtual environment, so the base must not need other packages. The same closed-loop
load (``bench/loadgen.py``, the request of ``bench/run.py``) goes to each in turn, the order
alternating run by run so that neither always runs on a warmer or quieter machine; the result
is each side's median CPU per request and throughput and the per-run ratios' medians. Noise on a
small shared machine is ±10 % and more: read a ratio together with the spread of its runs.
Nothing here asserts on speed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make ``bench`` and ``app`` importable
    sys.path.insert(0, str(ROOT))

from bench import loadgen, stack  # noqa: E402
from bench.run import BODY, MODEL  # noqa: E402


@contextlib.contextmanager
def checkout(base: str) -> Iterator[Path]:
    """``base`` as a directory: itself if it is one, else a temporary worktree of that rev."""
    if Path(base).is_dir():
        yield Path(base).resolve()
        return
    with tempfile.TemporaryDirectory(prefix="falgate-ab-") as tmp:
        tree = Path(tmp) / "base"
        git = ["git", "-C", str(ROOT)]
        subprocess.run([*git, "worktree", "add", "--detach", str(tree), base], check=True)
        try:
            yield tree
        finally:
            subprocess.run([*git, "worktree", "remove", "--force", str(tree)], check=False)


def _side(gateway: stack.Gateway, tool: str, concurrency: int, duration_s: float) -> dict[str, Any]:
    pid = gateway.service.pid
    before = stack.tree_cpu_seconds(pid)
    url = f"{gateway.url}/v1/run/{MODEL}"
    load = loadgen.run_load(tool, url, BODY, f"Bearer {gateway.key}", concurrency, duration_s)
    if load.non_2xx or load.socket_errors > max(1, load.requests // 100):
        raise RuntimeError(f"{gateway.service.name} answered errors: {load.to_json()}")
    cpu = stack.tree_cpu_seconds(pid) - before
    return {"rps": load.rps, "cpu_ms_per_request": cpu * 1000 / max(1, load.requests)}


def compare(
    base: Path, mode: str, concurrencies: list[int], runs: int, duration_s: float, tool: str
) -> dict[str, Any]:
    workdir = stack.make_workdir(None)
    services: list[Any] = []
    try:
        sandbox = stack.start_sandbox(workdir)
        services.append(sandbox)
        sides: dict[str, stack.Gateway] = {}
        for name, root in (("base", base), ("head", ROOT)):
            gateway = stack.start_gateway(workdir, sandbox.url, mode, variant=name, root=root)
            services.append(gateway)
            sides[name] = gateway
        result: dict[str, Any] = {"base": str(base), "mode": mode, "tool": tool, "by_c": {}}
        for concurrency in concurrencies:
            for gateway in sides.values():  # warm-up: connections, caches, the first requests
                _side(gateway, tool, concurrency, min(1.0, duration_s))
            rows: dict[str, list[dict[str, Any]]] = {"base": [], "head": []}
            for run in range(runs):
                order = ("base", "head") if run % 2 == 0 else ("head", "base")
                for name in order:
                    rows[name].append(_side(sides[name], tool, concurrency, duration_s))
            result["by_c"][str(concurrency)] = summary(rows)
        return result
    finally:
        for service in reversed(services):
            with contextlib.suppress(Exception):
                service.stop()
        stack.remove_workdir(workdir)


def summary(rows: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Each side's medians, and the medians of the per-run ratios head / base."""
    pairs = list(zip(rows["base"], rows["head"], strict=True))
    out: dict[str, Any] = {}
    for metric in ("cpu_ms_per_request", "rps"):
        out[metric] = {name: round(statistics.median(r[metric] for r in rows[name]), 3)
                       for name in ("base", "head")}  # fmt: skip
        ratios = [h[metric] / b[metric] for b, h in pairs if b[metric]]
        out[metric]["head_vs_base"] = round(statistics.median(ratios), 3) if ratios else None
        out[metric]["head_runs"] = [round(r[metric], 3) for r in rows["head"]]
        out[metric]["base_runs"] = [round(r[metric], 3) for r in rows["base"]]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="a git revision or a directory")
    parser.add_argument("--mode", choices=["sync", "queue"], default="sync")
    parser.add_argument("--concurrency", default="1,16", help="e.g. 1,16,64")
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per run")
    parser.add_argument("--loadgen", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument("--out", type=Path, help="also write the result here as JSON")
    args = parser.parse_args(argv)
    tool = args.loadgen
    if tool == "auto":
        tool = "wrk" if loadgen.wrk_available() else "python"
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    with checkout(args.base) as base:
        result = compare(base, args.mode, concurrencies, args.runs, args.duration, tool)
    for concurrency, row in result["by_c"].items():
        cpu, rps = row["cpu_ms_per_request"], row["rps"]
        print(
            f"{args.mode} c={concurrency}: CPU ms/req base {cpu['base']} head {cpu['head']} "
            f"(head/base {cpu['head_vs_base']}x); req/s base {rps['base']} head {rps['head']} "
            f"(head/base {rps['head_vs_base']}x)"
        )
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
