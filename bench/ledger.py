"""The ledger at scale: reports, export and archiving with a large ledger (issue 12).

Seeds a private Redis with ``--entries`` ledger entries (hold + settle/release pairs over
``--keys`` keys, spread over the last ``--days`` days, written as pre-rollup code wrote them),
starts the sandbox and one ``falgate serve`` on loopback, and measures:

- the one-time rollup backfill and the drain into the SQL archive (SQLite in the data dir),
  with Redis memory before and after (trimmed to the 48 h retention window);
- ``GET /admin/usage`` for the previous calendar month and for the last 30 days, grouped by
  key / model / day (median of runs);
- a full ``GET /admin/ledger`` export: entries per second, and the gateway's RSS during it;
- the p99 latency of metered requests (``POST /v1/generate``, concurrency 8) alone, and while
  a report loop and an export loop run against the same gateway (ratio, median over rounds).

    .venv/bin/python bench/ledger.py                  # 1M entries
    .venv/bin/python bench/ledger.py --entries 200000 --rounds 2
    .venv/bin/python bench/ledger.py --smoke          # 20k entries, seconds

Results: ``bench/results/ledger-latest.json`` and a Markdown table on stdout. Loopback only,
bounded in time and count; nothing here asserts on speed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import redis  # noqa: E402
from redis.typing import EncodableT, FieldT  # noqa: E402

from app.redis import EmbeddedRedis, free_port  # noqa: E402
from bench import loadgen, stack  # noqa: E402

MODELS = ["fal-ai/flux/dev", "fal-ai/flux/schnell", "fal-ai/flux-pro", "topaz"]
BODY = json.dumps({"prompt": "ledger bench", "image_size": {"width": 64, "height": 64}}).encode()
DAY_MS = 86_400_000


def seed(store: EmbeddedRedis, entries: int, keys: int, days: int) -> int:
    """Write ``entries`` ledger entries (pairs) with explicit, increasing ids per key."""
    client = redis.Redis.from_url(store.url)
    now_ms = int(time.time() * 1000)
    start_ms = now_ms - days * DAY_MS
    pairs_per_key = max(1, entries // 2 // keys)
    rng = random.Random(7)
    written = 0
    try:
        for k in range(keys):
            key_id = f"key_bench{k:05d}"
            client.hset(f"{{k:{key_id}}}:meta", mapping={"id": key_id, "status": "active"})
            client.sadd("falgate:keys", key_id)
            step = (now_ms - start_ms) // pairs_per_key
            pipe = client.pipeline(transaction=False)
            for i in range(pairs_per_key):
                ms = start_ms + i * step + rng.randrange(max(1, step // 2))
                model = MODELS[i % len(MODELS)]
                pixels = 786_432 * (1 + i % 3)
                amount = -(-pixels * 15_000 // 1_000_000)
                base: dict[FieldT, EncodableT] = {
                    "key_id": key_id, "request_id": f"req_{k:05d}{i:027d}",
                    "upstream_request_id": f"fal-{i}", "model": model,
                    "operation": "upscale" if model == "topaz" else "generate",
                    "pixels": str(pixels), "process_id": "proc_seed",
                }  # fmt: skip
                hold: dict[FieldT, EncodableT] = {
                    **base, "event": "hold", "amount_micro": str(amount), "ts_ms": str(ms)
                }  # fmt: skip
                pipe.xadd(f"{{k:{key_id}}}:ledger", hold, id=f"{ms}-0")
                settled = i % 10 != 9
                resolve: dict[FieldT, EncodableT] = {
                    **base,
                    "event": "settle" if settled else "release",
                    "amount_micro": str(amount),
                    "hold_micro": str(amount),
                    "released_micro": "0",
                    "reason": "completed" if settled else "upstream_error",
                    "ts_ms": str(ms + 1),
                }
                pipe.xadd(f"{{k:{key_id}}}:ledger", resolve, id=f"{ms + 1}-0")
                written += 2
                if len(pipe) >= 5000:
                    pipe.execute()
            pipe.execute()
    finally:
        client.close()
    return written


def redis_memory(store: EmbeddedRedis) -> int:
    client = redis.Redis.from_url(store.url)
    try:
        return int(client.info("memory")["used_memory"])
    finally:
        client.close()


def redis_entries(store: EmbeddedRedis) -> int:
    client = redis.Redis.from_url(store.url, decode_responses=True)
    try:
        # redis-py's stubs give the sync and asyncio clients one reply type (maybe awaitable).
        keys: set[str] = client.smembers("falgate:keys")  # type: ignore[assignment]
        return sum(int(client.xlen(f"{{k:{key}}}:ledger")) for key in keys)
    finally:
        client.close()


def cli(env: dict[str, str], *args: str) -> tuple[float, dict[str, Any]]:
    # A batch command on a shared machine: a longer Redis socket timeout than the gateway's.
    env = {**env, "FALGATE_REDIS_SOCKET_TIMEOUT_S": "10"}
    started = time.perf_counter()
    proc = subprocess.run(
        [*stack.falgate_command(), *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return time.perf_counter() - started, json.loads(proc.stdout)


def windows() -> dict[str, dict[str, str]]:
    """The previous calendar month, and the last 30 days (UTC)."""
    today = datetime.now(UTC).date()
    last_month_end = today.replace(day=1) - timedelta(days=1)
    return {
        "calendar month": {
            "from": last_month_end.replace(day=1).isoformat(),
            "to": last_month_end.isoformat(),
        },
        "last 30 days": {"from": (today - timedelta(days=30)).isoformat()},
    }


def usage_ms(url: str, group_by: str, runs: int, window: str = "calendar month") -> float:
    headers = {"Authorization": f"Bearer {stack.ADMIN_TOKEN}"}
    params = {**windows()[window], "group_by": group_by}
    times = []
    with httpx.Client(base_url=url, headers=headers, timeout=120) as client:
        for _ in range(runs):
            t0 = time.perf_counter()
            response = client.get("/admin/usage", params=params)
            times.append((time.perf_counter() - t0) * 1000)
            response.raise_for_status()
    return round(statistics.median(times), 2)


def export(url: str, pid: int | None = None) -> dict[str, Any]:
    """A full JSON-lines export, streamed and counted; samples the gateway's RSS meanwhile."""
    headers = {"Authorization": f"Bearer {stack.ADMIN_TOKEN}"}
    rss: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while pid is not None and not done.is_set():
            rss.append(stack.rss_kib(pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    before = stack.rss_kib(pid) if pid else 0
    sampler.start()
    lines = size = 0
    t0 = time.perf_counter()
    try:
        with (
            httpx.Client(base_url=url, headers=headers, timeout=600) as client,
            client.stream("GET", "/admin/ledger") as response,
        ):
            response.raise_for_status()
            for chunk in response.iter_bytes():
                lines += chunk.count(b"\n")
                size += len(chunk)
    finally:
        done.set()
        sampler.join()
    seconds = time.perf_counter() - t0
    return {
        "entries": lines,
        "bytes": size,
        "seconds": round(seconds, 2),
        "entries_per_s": round(lines / seconds),
        "rss_before_kib": before,
        "rss_max_kib": max(rss or [before]),
    }


def metered_p99(url: str, key: str, seconds: float) -> float:
    result = loadgen.run_python(f"{url}/v1/generate", BODY, f"Bearer {key}", 8, duration_s=seconds)
    return result.p99_ms


def with_background(url: str, key: str, seconds: float) -> float:
    """The metered p99 while reports and exports loop against the same gateway."""
    stop = threading.Event()

    def reports() -> None:
        while not stop.is_set():
            usage_ms(url, "model", 1)

    def exports() -> None:
        while not stop.is_set():
            export(url)

    threads = [threading.Thread(target=f, daemon=True) for f in (reports, exports)]
    for t in threads:
        t.start()
    try:
        return metered_p99(url, key, seconds)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=600)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--keys", type=int, default=100)
    parser.add_argument("--days", type=int, default=45)  # covers the previous calendar month
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--load-seconds", type=float, default=10.0)
    parser.add_argument("--smoke", action="store_true", help="20k entries, 1 round of 2 s")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / "ledger-latest.json"
    )
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args(argv)
    if args.smoke:
        args.entries, args.keys, args.rounds, args.load_seconds = 20_000, 20, 1, 2.0

    workdir = stack.make_workdir(args.workdir)
    data_dir = workdir / "gateway"
    data_dir.mkdir()
    store = EmbeddedRedis(data_dir / "redis", persist=False)
    store.start()
    sandbox = None
    gateway = None
    result: dict[str, Any] = {"entries": args.entries, "keys": args.keys, "days": args.days}
    try:
        t0 = time.perf_counter()
        result["seeded"] = seed(store, args.entries, args.keys, args.days)
        result["seed_s"] = round(time.perf_counter() - t0, 1)
        result["redis_used_memory_before"] = redis_memory(store)
        port = free_port()
        sandbox = stack.start_sandbox(workdir)
        env = {
            **os.environ,
            "FALGATE_HOST": "127.0.0.1",
            "FALGATE_PORT": str(port),
            "FALGATE_DATA_DIR": str(data_dir),
            "FALGATE_REDIS_URL": store.url,
            "FALGATE_SANDBOX_URL": sandbox.url,
            "FALGATE_ADMIN_TOKEN": stack.ADMIN_TOKEN,
            "FALGATE_LEDGER_DRAIN_INTERVAL_S": "0",  # drained below, by the command, timed
            "FALGATE_DEFAULT_RPM": "1000000",
            "FALGATE_DEFAULT_MAX_CONCURRENT": "10000",
            "FALGATE_UPSTREAM_MAX_CONCURRENT": "1000",
        }
        for name in ("FAL_KEY", "FALGATE_FAL_KEY"):
            env.pop(name, None)
        seconds, out = cli(env, "ledger", "backfill")
        result["backfill"] = {"seconds": round(seconds, 1), **out}
        seconds, out = cli(env, "ledger", "drain", "--wait", "5")
        result["drain"] = {
            "seconds": round(seconds, 1),
            "entries_per_s": round(out["archived"] / seconds),
            **out,
        }
        result["redis_used_memory_after"] = redis_memory(store)
        result["redis_entries_after"] = redis_entries(store)
        result["redis_entries_within_retention"] = round(result["seeded"] * min(1.0, 2 / args.days))

        proc, log = stack._spawn("gateway", [*stack.falgate_command(), "serve"], data_dir, env)
        url = f"http://127.0.0.1:{port}"
        stack.wait_http(f"{url}/healthz", proc, log, timeout_s=120)
        gateway = stack.Service("gateway", url, proc, log)
        response = httpx.post(
            f"{url}/admin/keys",
            json=stack.GENEROUS_KEY,
            headers={"Authorization": f"Bearer {stack.ADMIN_TOKEN}"},
            timeout=30,
        )
        response.raise_for_status()
        key = response.json()["key"]

        result["usage_ms"] = {
            f"{window}, by {g}": usage_ms(url, g, 15, window)
            for window in windows()
            for g in ("key", "model", "day")
        }
        result["export"] = export(url, proc.pid)
        alone, loaded = [], []
        for _ in range(args.rounds):
            alone.append(metered_p99(url, key, args.load_seconds))
            loaded.append(with_background(url, key, args.load_seconds))
        result["p99_ms_alone"] = alone
        result["p99_ms_with_report_and_export"] = loaded
        result["p99_ratio_median"] = round(
            statistics.median(b / a for a, b in zip(alone, loaded, strict=True) if a), 3
        )
    finally:
        if gateway is not None:
            gateway.stop()
        if sandbox is not None:
            sandbox.stop()
        store.stop()
        stack.remove_workdir(workdir)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(render(result))
    return 0


def render(r: dict[str, Any]) -> str:
    mb = 1024 * 1024
    rows = [
        ("ledger entries seeded", f"{r['seeded']:,} over {r['keys']} keys, {r['days']} days"),
        ("rollup backfill (one-time)", f"{r['backfill']['seconds']} s"),
        ("drain into SQLite", f"{r['drain']['entries_per_s']:,} entries/s"),
        (
            "Redis memory before / after drain",
            f"{r['redis_used_memory_before'] / mb:.1f} MB / "
            f"{r['redis_used_memory_after'] / mb:.1f} MB"
            f" ({r['redis_entries_after']:,} entries kept; 48 h window ~ "
            f"{r['redis_entries_within_retention']:,})",
        ),
        *((f"/admin/usage, {name} (median)", f"{ms} ms") for name, ms in r["usage_ms"].items()),
        (
            "full export (/admin/ledger, JSON lines)",
            f"{r['export']['entries_per_s']:,} entries/s ({r['export']['entries']:,} entries)",
        ),
        (
            "gateway RSS before / max during export",
            f"{r['export']['rss_before_kib'] / 1024:.0f} MB / "
            f"{r['export']['rss_max_kib'] / 1024:.0f} MB",
        ),
        ("metered p99 with report+export / alone (median)", f"{r['p99_ratio_median']}x"),
    ]
    lines = ["| measure | result |", "|---|---|"]
    lines += [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
