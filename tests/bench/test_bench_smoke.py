"""The benchmark machinery still works: ``bench/run.py --smoke`` end to end, ~1 s per target.

Nothing here looks at speed (that is the benchmark's job, and its numbers go in the README);
it checks that a run yields a well-formed result with real traffic through every target, and
that the gateway's ledger shows every admitted request settled.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import stack
from bench.stack import nginx_binary

ROOT = Path(__file__).resolve().parents[2]
# The Python fallback always (CI has no wrk); wrk too where it is installed.
TOOLS = ["python", *(["wrk"] if shutil.which("wrk") else [])]


def _bench(script: str, *args: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    """``bench/<script> args`` run to its end, which must be a success."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.parametrize("tool", TOOLS)
def test_smoke_run_yields_a_complete_result(tmp_path: Path, tool: str) -> None:
    out = tmp_path / "result.json"
    workdir = str(tmp_path / "work")
    args = ["--smoke", "--loadgen", tool, "--out", str(out), "--workdir", workdir, "--workers", "2"]
    proc = _bench("run.py", *args, timeout_s=240)
    result = json.loads(out.read_text())

    names = {
        "sandbox",
        "passthrough",
        "passthrough-queue",
        "gateway-sync",
        "gateway-queue",
        "gateway-sync-2w",
    }
    # The workers again in front of the fixed-reply nginx stub (the test command installs it).
    stubbed = {"gateway-sync-stub", "gateway-sync-stub-2w"} if nginx_binary() else set()
    names |= stubbed
    assert {m["target"] for m in result["runs"]} == names
    for m in result["runs"]:
        assert m["ok"] > 0, m
        # Not a speed check: a misconfigured target answers errors, not one rare 502.
        assert m["non_2xx"] + m["socket_errors"] <= max(1, m["requests"] // 100), m
        assert m["p50_ms"] > 0 and m["p99_ms"] >= m["p50_ms"], m
        assert m["wakeups_per_request"] >= 0, m  # a busy server may never sleep in 1 s
        if m["target"] == "passthrough-queue":
            # Queue mode's baseline: nothing in it retries or forgives, so any error answer
            # means it does not follow the sandbox's queue protocol (and its CPU per request
            # would be that of a cheap error, not of submit + status stream + result).
            assert m["non_2xx"] == 0, m
    for conc in result["meta"]["concurrencies"]:
        assert set(result["summary"][str(conc)]) == names
        assert result["summary"][str(conc)]["passthrough-queue"]["non_2xx"] == 0
        for target in names - {"sandbox"} - stubbed:
            comparison = result["comparisons"][str(conc)][target]
            assert comparison["throughput_vs_passthrough"] is not None
            assert comparison["added_p50_ms"] is not None
            assert comparison["cpu_over_passthrough_ms"] is not None
            expected = "passthrough-queue" if target == "gateway-queue" else "passthrough"
            assert comparison["passthrough_baseline"] == expected, (target, comparison)
        queue = result["comparisons"][str(conc)]["gateway-queue"]
        assert queue["added_p50_vs_sandbox_ms"] is not None
    # Over all its traffic, warm-up included: not one error answer or failed request.
    assert result["responses"]["passthrough-queue"]["2xx"] > 0
    assert result["responses"]["passthrough-queue"]["failed"] == 0, result["responses"]

    assert result["comparisons"][str(max(result["meta"]["concurrencies"]))]["gateway-sync-2w"][
        "throughput_vs_one_worker"
    ]
    top = str(max(result["meta"]["concurrencies"]))
    for target in stubbed:  # the stub answered every request the gateways sent it
        assert result["summary"][top][target]["upstream_cpu_ms_per_request"] > 0, target
        assert result["comparisons"][top][target]["throughput_vs_passthrough"] is None
    if stubbed:
        assert result["comparisons"][top]["gateway-sync-stub-2w"]["throughput_vs_one_worker"]
    for mode in ("sync", "queue", "sync-2w", *(n.removeprefix("gateway-") for n in stubbed)):
        if mode in ("sync", "queue"):
            redis = result["redis"][mode]
            assert redis["admitted"] > 0 and redis["commands_total"] > 0
        ledger = result["ledger"][mode]
        assert ledger["hold"] > 0
        assert ledger["open_holds"] == 0 and ledger["in_flight"] == 0, (mode, ledger)  # none open
        assert ledger["hold"] == ledger["settle"] + ledger["release"]
        # Every 2xx was settled; the only releases are failed requests and those wrk cut off.
        assert ledger["settle"] >= ledger["responses_2xx"] > 0
        assert ledger["release"] <= ledger["cut_off_at_most"] + ledger["responses_failed"]
        if tool == "python":  # the Python generator lets every request finish
            assert ledger["settle"] == ledger["responses_2xx"]
            assert ledger["release"] <= ledger["responses_failed"]
        assert ledger["all_settled"]

    memory = result["memory"]
    assert memory["requests"] > 0 and memory["rss_after_mib"] > 0
    target_names = {row["name"] for row in result["targets"]}
    for conc in result["meta"]["concurrencies"]:
        own = f"falgate's own CPU per request, concurrency {conc}"
        assert f"{own} (gateway-sync)" in target_names
        assert f"{own} (gateway-queue, vs the queue pass-through)" in target_names
    assert "| concurrency | target |" in proc.stdout  # the Markdown table was printed
    assert "| gateway-queue (vs passthrough-queue) |" in proc.stdout
    assert "slept waiting and was woken, per request at concurrency 4" in proc.stdout


def test_the_upstream_client_benchmark_measures_every_way() -> None:
    """``bench/upstream_client.py`` (per-call CPU by client layer, against the nginx stub):
    a short run prints a row for each way, each a positive number of microseconds."""
    if nginx_binary() is None:
        pytest.fail("nginx is missing: the test command installs nginx-light")
    proc = _bench("upstream_client.py", "--rounds", "1", "--calls", "50", timeout_s=120)
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines()[2:]]
    assert [row[0].strip() for row in rows] == [
        "httpx-client",
        "httpx-client-url",
        "direct-client",
        "transport",
        "aiohttp",
    ]
    assert all(float(row[1]) > 0 for row in rows)
    assert rows[-1][2].strip() == "+0"  # the floor, against itself


def test_the_ab_comparison_runs_two_checkouts(tmp_path: Path) -> None:
    """``bench/ab.py`` against a git revision (checked out as a worktree) of this checkout."""
    out = tmp_path / "ab.json"
    proc = _bench(
        "ab.py",
        *("--base", "HEAD", "--concurrency", "2", "--runs", "2", "--duration", "0.5"),
        *("--loadgen", "python", "--out", str(out)),
        timeout_s=180,
    )
    result = json.loads(out.read_text())
    assert result["mode"] == "sync" and Path(result["base"]) != ROOT
    row = result["by_c"]["2"]
    for metric in ("cpu_ms_per_request", "rps"):
        assert row[metric]["base"] > 0 and row[metric]["head"] > 0, row
        assert len(row[metric]["base_runs"]) == len(row[metric]["head_runs"]) == 2
        assert row[metric]["head_vs_base"] > 0
    assert "sync c=2: CPU ms/req base" in proc.stdout
    # The temporary worktree is gone again.
    worktrees = subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "list"], capture_output=True, text=True, check=True
    )
    assert result["base"] not in worktrees.stdout


def test_the_ledger_benchmark_accounts_for_every_seeded_entry(tmp_path: Path) -> None:
    """``bench/ledger.py --smoke`` (the README's "ledger at scale"): every entry it seeds is
    archived by the drain, and the full export after the drain returns each one exactly once,
    from the archive and the Redis window together."""
    out = tmp_path / "ledger.json"
    proc = _bench(
        "ledger.py", "--smoke", "--out", str(out), "--workdir", str(tmp_path / "work"),
        timeout_s=240,
    )  # fmt: skip
    result = json.loads(out.read_text())
    assert result["seeded"] == result["entries"] > 0
    assert result["drain"]["archived"] == result["seeded"]
    assert result["redis_entries_after"] == result["seeded"] - result["drain"]["trimmed"] > 0
    assert result["export"]["entries"] == result["seeded"]
    assert all(ms > 0 for ms in result["usage_ms"].values()), result["usage_ms"]
    assert len(result["p99_ms_alone"]) == len(result["p99_ms_with_report_and_export"]) >= 1
    assert "| full export (/admin/ledger, JSON lines) |" in proc.stdout


def test_wakeups_count_every_sleep_of_a_process_and_its_children() -> None:
    """``stack.tree_wakeups``: a process that sleeps 30 times, with a live child that sleeps 30
    times, has been woken at least 60 times (each sleep is a voluntary context switch)."""
    code = "import os, time\nos.fork()\nfor _ in range(30): time.sleep(0.005)\ntime.sleep(60)\n"
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while stack.tree_wakeups(proc.pid) < 60 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stack.tree_wakeups(proc.pid) >= 60
        assert stack.tree_wakeups(proc.pid) < 60 + 200  # not some other process's count
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
