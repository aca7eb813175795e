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
            {**_row(run, "gateway-sync-stub", 500 * slow, 2.0), "upstream_cpu_ms_per_request": 0.05},
            {**_row(run, "gateway-sync-stub-2w", (800 + 50 * run) * slow, 2.1),
             "upstream_cpu_ms_per_request": 0.04 + 0.01 * run},
        ]  # fmt: skip
    result = summarise(rows, profile)
    sync = result["comparisons"]["64"]["gateway-sync"]
    assert sync["throughput_vs_peer"] == 3.0
    assert sync["cpu_vs_peer"] == 0.24
    assert sync["throughput_vs_one_worker"] is None
    assert (sync["throughput_vs_old_upstream"], sync["cpu_vs_old_upstream"]) == (1.5, 0.8)
    two = result["comparisons"]["64"]["gateway-sync-2w"]
    assert two["throughput_vs_one_worker"] == 1.6  # median of 1.5, 1.6, 1.7
    assert result["comparisons"]["64"]["litellm"]["throughput_vs_peer"] is None
    # In front of the fixed-reply stub: against the one-worker gateway on the same stub only
    # (no pass-through or peer shares that upstream), with the stub's own CPU per request.
    stub = result["comparisons"]["64"]["gateway-sync-stub-2w"]
    assert stub["throughput_vs_one_worker"] == 1.7  # median of 1.6, 1.7, 1.8
    for target in ("gateway-sync-stub", "gateway-sync-stub-2w"):
        cmp = result["comparisons"]["64"][target]
        assert cmp["passthrough_baseline"] is None and cmp["latency_baseline"] is None
        for field in ("throughput_vs_passthrough", "added_p50_ms", "cpu_over_passthrough_ms",
                      "throughput_vs_peer"):  # fmt: skip
            assert cmp[field] is None, (target, field)
        assert "added_p50_vs_sandbox_ms" not in cmp
    assert result["summary"]["64"]["gateway-sync-stub-2w"]["upstream_cpu_ms_per_request"] == 0.05
    assert result["summary"]["64"]["gateway-sync"]["upstream_cpu_ms_per_request"] is None

    result["meta"] = {"peer": "litellm"}
    targets = {row["name"]: row for row in check_targets(result)}
    assert targets["throughput vs litellm, concurrency 64 (gateway-sync)"]["met"] is True
    # The worker goal is for an upstream off the gateway's cores: the sandbox row only informs.
    on_sandbox = "gateway-sync-2w vs one worker, concurrency 64 (the sandbox, on these cores)"
    assert targets[on_sandbox]["met"] is None
    on_stub = "gateway-sync-stub-2w vs one worker, concurrency 64 (a fixed-reply nginx upstream)"
    assert (targets[on_stub]["measured"], targets[on_stub]["met"]) == ("1.70x", True)
    assert targets["falgate's own CPU per request, concurrency 64 (gateway-sync)"]["met"] is False
    assert not any("gateway-sync-stub" in name and "litellm" in name for name in targets)
    # Issue 15's 90 % (issue 7 asked for 60 %): 300 of the pass-through's 400 req/s is missed.
    share = targets["throughput vs passthrough, concurrency 64 (sync)"]
    assert (share["goal"], share["measured"], share["met"]) == ("≥ 90 %", "75%", False)

    lines = report._relative(result)
    assert "| 64 | gateway-sync | 3.00x | 0.24x | - | 1.50x | 0.80x |" in lines
    assert "| 64 | gateway-sync-2w | 4.80x | 0.22x | 1.60x | - | - |" in lines
    assert "| 64 | gateway-sync-stub-2w | - | - | 1.70x | - | - |" in lines


def _meta() -> dict[str, Any]:
    machine = {"cpu_model": "cpu", "cores": 2, "memory_gib": 1.0, "python": "3", "platform": "x"}
    return {
        "date": "d",
        "machine": machine,
        "tool": "wrk",
        "profile": "smoke",
        "runs": 2,
        "duration_s": 1.0,
        "commit": "c",
        "command": "bench/run.py",
        "peer": None,
    }


def test_the_queue_gateway_is_compared_with_the_queue_pass_through() -> None:
    profile = Profile(**{**PROFILES["smoke"].__dict__, "runs": 2, "concurrencies": (16,)})
    rows = []
    for run, slow in enumerate((1.0, 0.5)):
        rows += [
            {**_row(run, "sandbox", 1000 * slow, 1.5, 16), "p50_ms": 2.0, "p99_ms": 4.0},
            _row(run, "passthrough", 500 * slow, 1.0, 16),
            {**_row(run, "passthrough-queue", 250 * slow, 2.0, 16), "p50_ms": 15.0},
            _row(run, "gateway-sync", 400 * slow, 1.8, 16),
            {**_row(run, "gateway-queue", 200 * slow, 3.5, 16), "p50_ms": 18.0, "p99_ms": 30.0},
        ]
    result = summarise(rows, profile)
    cmp = result["comparisons"]["16"]
    queue = cmp["gateway-queue"]
    assert queue["passthrough_baseline"] == "passthrough-queue"
    assert queue["latency_baseline"] == "passthrough-queue"
    assert queue["throughput_vs_passthrough"] == 0.8
    assert queue["cpu_over_passthrough_ms"] == 1.5  # not 2.5, against the sync pass-through
    assert (queue["added_p50_ms"], queue["added_p99_ms"]) == (3.0, 10.0)
    assert (queue["added_p50_vs_sandbox_ms"], queue["added_p99_vs_sandbox_ms"]) == (16.0, 26.0)
    sync = cmp["gateway-sync"]
    assert (sync["passthrough_baseline"], sync["latency_baseline"]) == ("passthrough", "sandbox")
    assert (sync["throughput_vs_passthrough"], sync["cpu_over_passthrough_ms"]) == (0.8, 0.8)
    assert (sync["added_p50_ms"], sync["added_p99_ms"]) == (8.0, 16.0)
    assert "added_p50_vs_sandbox_ms" not in sync
    # The queue pass-through itself: what fal's queue protocol costs a bare proxy over sync.
    assert cmp["passthrough-queue"]["passthrough_baseline"] == "passthrough"
    assert cmp["passthrough-queue"]["cpu_over_passthrough_ms"] == 1.0

    result["meta"] = _meta()
    result["targets"] = check_targets(result)
    names = {row["name"] for row in result["targets"]}
    assert "falgate's own CPU per request, concurrency 16 (gateway-sync)" in names
    assert (
        "falgate's own CPU per request, concurrency 16 (gateway-queue, vs the queue pass-through)"
        in names
    )
    text = report.render(result)
    assert "| 16 | gateway-queue (vs passthrough-queue) | 150 |" in text
    assert "| 16 | gateway-sync | 300 |" in text
    assert "against **passthrough-queue**" in text
    assert "16.00 / 26.00 ms at concurrency 16" in text


def test_a_result_without_the_queue_pass_through_still_renders() -> None:
    """Results written before the queue baseline (no baseline fields) render as before."""
    profile = Profile(**{**PROFILES["smoke"].__dict__, "runs": 1, "concurrencies": (16,)})
    rows = [
        _row(0, "sandbox", 1000, 1.5, 16),
        _row(0, "passthrough", 500, 1.0, 16),
        _row(0, "gateway-queue", 200, 3.5, 16),
    ]
    result = summarise(rows, profile)
    queue = result["comparisons"]["16"]["gateway-queue"]
    assert queue["passthrough_baseline"] == "passthrough"  # no queue pass-through measured
    assert queue["cpu_over_passthrough_ms"] == 2.5
    for cmp in result["comparisons"]["16"].values():  # as an older run.py wrote them
        for key in [k for k in cmp if "baseline" in k or "vs_sandbox" in k]:
            del cmp[key]
    result["meta"] = _meta()
    result["targets"] = check_targets(result)
    assert "falgate's own CPU per request, concurrency 16 (gateway-queue)" in {
        row["name"] for row in result["targets"]
    }
    text = report.render(result)
    assert "| 16 | gateway-queue | 200 |" in text
    assert "passthrough-queue" not in text
