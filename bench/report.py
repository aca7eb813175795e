"""Markdown for a benchmark result (the README's table): ``python bench/report.py [result.json]``.

Without an argument it renders ``bench/results/latest.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _mark(met: bool | None) -> str:
    return {True: "met", False: "**missed**", None: "n/a"}[met]


def render(result: dict[str, Any]) -> str:
    """The machine, the command, the results table, Redis, memory and the targets."""
    meta = result["meta"]
    machine = meta["machine"]
    lines = [
        f"Measured {meta['date']} on {machine['cpu_model']}, {machine['cores']} cores "
        f"(load generator, gateway, sandbox and Redis all share them), "
        f"{machine['memory_gib']} GiB, Python {machine['python']}, {machine['platform']}; "
        f"load generator: **{meta['tool']}**; profile `{meta['profile']}`: "
        f"{meta['runs']} runs of {meta['duration_s']:g} s per target and concurrency, "
        f"medians shown; commit `{meta['commit']}`; load average at start "
        f"{meta.get('load_average_at_start', '?')}.",
        "",
        f"Command: `{meta['command']}`",
        "",
        "| concurrency | target | req/s | p50 ms | p99 ms | CPU ms/req "
        "| req/s vs pass-through | added p50 ms | added p99 ms | CPU over pass-through ms |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rebased: dict[str, str] = {}  # target -> the pass-through it was compared with, if not sync
    over_sandbox: dict[str, list[str]] = {}
    for conc, per_target in result["summary"].items():
        for target, row in per_target.items():
            cmp = result["comparisons"].get(conc, {}).get(target, {})
            ratio = cmp.get("throughput_vs_passthrough")
            # Results before the queue pass-through have no baseline fields: all were "sync".
            base = cmp.get("passthrough_baseline", "passthrough")
            label = target
            if base is None:  # in front of the fixed-reply stub: compared with each other only
                label = f"{target} (fixed-reply upstream)"
            elif base != "passthrough":
                rebased[target] = base
                label = f"{target} (vs {base})"
                if cmp.get("added_p50_vs_sandbox_ms") is not None:
                    over_sandbox.setdefault(target, []).append(
                        f"{_fmt(cmp['added_p50_vs_sandbox_ms'])} / "
                        f"{_fmt(cmp.get('added_p99_vs_sandbox_ms'))} ms at concurrency {conc}"
                    )
            lines.append(
                f"| {conc} | {label} | {row['rps']:.0f} | {_fmt(row['p50_ms'])} "
                f"| {_fmt(row['p99_ms'])} | {_fmt(row.get('cpu_ms_per_request'))} | "
                f"{'-' if ratio is None else f'{ratio:.0%}'} "
                f"| {_fmt(cmp.get('added_p50_ms'))} | {_fmt(cmp.get('added_p99_ms'))} "
                f"| {_fmt(cmp.get('cpu_over_passthrough_ms'))} |"
            )
    lines.append("")
    for target, base in rebased.items():
        note = (
            f"{target}: req/s vs pass-through, added p50/p99 and CPU over pass-through are "
            f"taken against **{base}** (the bare proxy following fal's queue protocol too: "
            "submit, status stream, result), not the sync pass-through and the sandbox."
        )
        if over_sandbox.get(target):
            note += " Added p50 / p99 over calling the sandbox directly: "
            note += "; ".join(over_sandbox[target]) + "."
        lines += [note, ""]
    stub = [
        f"{target} {row['upstream_cpu_ms_per_request']:.3f} ms at concurrency {conc}"
        for conc, per_target in result["summary"].items()
        for target, row in per_target.items()
        if row.get("upstream_cpu_ms_per_request") is not None
    ]
    if stub:
        lines += [
            "Fixed-reply upstream: nginx (one worker process) answering every request with one "
            "answer the sandbox gave, so that the gateway's processes have the cores to "
            "themselves; its CPU per request: " + "; ".join(stub) + ".",
            "",
        ]
    lines += _relative(result)
    redis_cpu = [
        f"{target} {row['redis_cpu_ms_per_request']:.2f} ms at concurrency {conc}"
        for conc, per_target in result["summary"].items()
        for target, row in per_target.items()
        if row.get("redis_cpu_ms_per_request")
    ]
    if redis_cpu:
        lines += ["Redis server CPU per request: " + "; ".join(redis_cpu) + ".", ""]
    lowest = min(result["summary"], key=int, default=None)
    wakeups = [
        f"{target} {row['wakeups_per_request']:.2f}"
        for target, row in (result["summary"].get(lowest) or {}).items()
        if row.get("wakeups_per_request") is not None
    ]
    if wakeups:
        lines += [
            "Times a target's process slept waiting and was woken, per request at concurrency "
            f"{lowest} (voluntary context switches): " + "; ".join(wakeups) + ".",
            "",
        ]
    redis = result.get("redis") or {}
    if redis:
        lines += [
            "| gateway mode | admitted requests | Redis commands per request "
            "| Redis round trips per request | commands by kind, per request |",
            "|---|---:|---:|---:|---|",
        ]
        for mode, row in redis.items():
            detail = ", ".join(
                f"{k} {v:.2f}" for k, v in row["by_command_per_request"].items() if v >= 0.005
            )
            lines.append(
                f"| {mode} | {row['admitted']} | {row['per_request']:.2f} "
                f"| {row.get('round_trips_per_request', 0):.2f} | {detail} |"
            )
        lines.append("")
    memory = result.get("memory")
    if memory:
        points = memory["samples"]
        if len(points) > 6:  # first, last and four between
            step = (len(points) - 1) / 5
            points = [points[round(i * step)] for i in range(6)]
        samples = ", ".join(f"{p['rss_mib']:.1f} at {p['requests'] // 1000}k" for p in points)
        lines += [
            f"Gateway RSS ({memory['mode']} mode): {memory['rss_idle_mib']:.1f} MiB idle at "
            f"start, {memory['rss_before_mib']:.1f} MiB after warm-up, "
            f"{memory['rss_after_mib']:.1f} MiB after {memory['requests']} more requests "
            f"(MiB at requests served: {samples}).",
            "",
        ]
    lines += ["| target | goal | measured | |", "|---|---|---:|---|"]
    for row in result["targets"]:
        lines.append(f"| {row['name']} | {row['goal']} | {row['measured']} | {_mark(row['met'])} |")
    return "\n".join(lines) + "\n"


def _relative(result: dict[str, Any]) -> list[str]:
    """Ratios against the peer gateway and the one-worker gateway, when they were measured."""
    rows = [
        (conc, target, cmp)
        for conc, per_target in result["comparisons"].items()
        for target, cmp in per_target.items()
        if cmp.get("throughput_vs_peer") is not None
        or cmp.get("throughput_vs_one_worker") is not None
        or cmp.get("throughput_vs_old_upstream") is not None
    ]
    if not rows:
        return []
    peer = result["meta"].get("peer") or "peer"
    lines = [
        f"| concurrency | target | req/s vs {peer} | CPU/req vs {peer} | req/s vs one worker "
        "| req/s vs old upstream path | CPU/req vs old upstream path |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for conc, target, cmp in rows:
        lines.append(
            f"| {conc} | {target} | {_ratio(cmp.get('throughput_vs_peer'))} "
            f"| {_ratio(cmp.get('cpu_vs_peer'))} | {_ratio(cmp.get('throughput_vs_one_worker'))} "
            f"| {_ratio(cmp.get('throughput_vs_old_upstream'))} "
            f"| {_ratio(cmp.get('cpu_vs_old_upstream'))} |"
        )
    return [*lines, ""]


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0]) if args else RESULTS_DIR / "latest.json"
    print(render(json.loads(path.read_text())), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
