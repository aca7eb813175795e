"""The benchmark's same-run comparisons: against a peer gateway and against one worker.

``summarise`` takes ratios within each run (so a busy machine slows both sides of a ratio
alike), then the median over runs; these feed it measurements and check that arithmetic.
"""

from __future__ import annotations

from typing import Any

from bench import report
from bench.run import PROFILES, Profile, check_targets, summarise


def _row(run: int, target: str, rps: float, cpu: float, conc: int = 64) -> dict[str, Any]:
    return {
        "run": run,
        "target": target,
        "concurrency": conc,
        "rps": rps,
        "p50_ms": 10.0,
        "p99_ms": 20.0,
        "cpu_ms_per_request": cpu,
        "redis_cpu_ms_per_request": None,
        "non_2xx": 0,
        "socket_errors": 0,
        "requests": int(rps),
    }


def test_ratios_against_the_peer_and_one_worker_are_per_run_medians() -> None:
    profile = Profile(**{**PROFILES["smoke"].__dict__, "runs": 3, "concurrencies": (64,)})
    rows = []
    # The machine gets slower run by run: each ratio is taken within its run.
    for run, slow in enumerate((1.0, 0.5, 0.25)):
        rows += [
            _row(run, "sandbox", 1000 * slow, 1.0),
            _row(run, "passthrough", 400 * slow, 1.5),
            _row(run, "gateway-sync", 300 * slow, 2.4),
            _row(run, "gateway-sync-2w", (450 + 30 * run) * slow, 2.2),
            _row(run, "litellm", 100 * slow, 10.0),
            _row(run, "gateway-sync-old", 200 * slow, 3.0),
        ]
    result = summarise(rows, profile)
    sync = result["comparisons"]["64"]["gateway-sync"]
    assert sync["throughput_vs_peer"] == 3.0
    assert sync["cpu_vs_peer"] == 0.24
    assert sync["throughput_vs_one_worker"] is None
    assert (sync["throughput_vs_old_upstream"], sync["cpu_vs_old_upstream"]) == (1.5, 0.8)
    two = result["comparisons"]["64"]["gateway-sync-2w"]
    assert two["throughput_vs_one_worker"] == 1.6  # median of 1.5, 1.6, 1.7
    assert result["comparisons"]["64"]["litellm"]["throughput_vs_peer"] is None

    result["meta"] = {"peer": "litellm"}
    targets = {row["name"]: row for row in check_targets(result)}
    assert targets["throughput vs litellm, concurrency 64 (gateway-sync)"]["met"] is True
    assert targets["gateway-sync-2w vs one worker, concurrency 64"]["met"] is True
    assert targets["falgate's own CPU per request, concurrency 64 (gateway-sync)"]["met"] is False

    lines = report._relative(result)
    assert "| 64 | gateway-sync | 3.00x | 0.24x | - | 1.50x | 0.80x |" in lines
    assert "| 64 | gateway-sync-2w | 4.80x | 0.22x | 1.60x | - | - |" in lines
