"""The processes the benchmark measures, all on loopback, and what it reads from them.

- :func:`start_sandbox`: ``falgate sandbox`` (fal emulator), no simulated latency;
- :func:`start_passthrough`: ``bench/passthrough.py``, the baseline proxy (sync, or fal's queue
  protocol for queue mode's baseline);
- :func:`start_stub`: nginx answering every request with one answer the sandbox gave (a
  fixed-reply upstream that needs almost no CPU, for measuring gateway workers);
- :func:`start_gateway`: ``falgate serve`` with keys, metering and rate limits on, against its
  own private Redis (``app.redis.EmbeddedRedis``, the server the tests use), so Redis traffic
  can be attributed to one gateway;
- :class:`CommandCounter`: Redis ``MONITOR``, counting the commands clients send (commands run
  inside Lua scripts are listed by Redis as coming from ``lua`` and are not round trips);
- :func:`ledger_summary`: the key's ledger stream and open holds, read from Redis;
- :func:`rss_kib`: a process's resident memory from ``/proc/<pid>/status``.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import httpx
import redis

from app.metering import keyspace
from app.metering.lua import Composite
from app.redis import EmbeddedRedis, free_port

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "bench"
ADMIN_TOKEN = "bench-admin-token-" + secrets.token_hex(12)


@dataclass
class Service:
    """One server process on 127.0.0.1."""

    name: str
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        stop_process(self.proc)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 15 s: only ever the process this module started."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited ({proc.returncode}):\n{_tail(log)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code < 500:
                return
        time.sleep(0.05)
    stop_process(proc)
    raise RuntimeError(f"{url} did not come up:\n{_tail(log)}")


def _tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace")[-4000:]
    except FileNotFoundError:
        return ""


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM the child if the benchmark itself is killed outright."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _spawn(
    name: str,
    args: list[str],
    workdir: Path,
    env: dict[str, str] | None = None,
    *,
    root: Path = ROOT,
) -> tuple[subprocess.Popen[bytes], Path]:
    """Start ``args`` in ``root`` (whose ``app`` package ``python -m app.cli`` then runs)."""
    log = workdir / f"{name}.log"
    proc = subprocess.Popen(
        args,
        cwd=root,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env if env is not None else dict(os.environ),
        preexec_fn=_die_with_parent,
    )
    return proc, log


spawn = _spawn
Logger = Callable[[str], None]


def falgate_command() -> list[str]:
    """``falgate`` as ``python -m app.cli``: the code of this checkout, whatever is installed."""
    return [sys.executable, "-m", "app.cli"]


def start_sandbox(workdir: Path) -> Service:
    port = free_port()
    options = ["--port", str(port), "--latency-ms", "0", "--no-access-log"]
    proc, log = _spawn("sandbox", [*falgate_command(), "sandbox", *options], workdir)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/_sandbox/config", proc, log)
    # No generation time, and a small image store: the sandbox answers as fast as it can and
    # its memory stays bounded over hundreds of thousands of requests.
    config = {"latency_ms": 0, "queue_ms": 0, "max_file_bytes": 64 * 1024 * 1024}
    httpx.put(f"{url}/_sandbox/config", json=config, timeout=10).raise_for_status()
    return Service("sandbox", url, proc, log)


def nginx_binary() -> str | None:
    """Debian's nginx (``apt-get install nginx-light``), if installed."""
    found = shutil.which("nginx")
    if found is None and os.access("/usr/sbin/nginx", os.X_OK):
        found = "/usr/sbin/nginx"
    return found


_STUB_CONF = """\
{user}worker_processes 1;
daemon off;
pid {workdir}/stub-nginx.pid;
error_log {workdir}/stub.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_buffer_size 64k;
    client_body_temp_path {workdir}/stub-temp;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            default_type application/json;
            add_header X-Fal-Request-Id {request_id} always;
            return 200 '{body}';
        }}
    }}
}}
"""


def start_stub(workdir: Path, sandbox_url: str, body: bytes) -> Service | None:
    """nginx with one worker, answering any request with the sandbox's answer to ``body``
    (its JSON and ``X-Fal-Request-Id``, recorded once at start): an upstream that costs tens
    of microseconds of CPU per request, so that the gateway's processes have the machine's
    cores to themselves. None if nginx is not installed."""
    binary = nginx_binary()
    if binary is None:
        return None
    answer = httpx.post(
        f"{sandbox_url}/fal-ai/flux/dev",
        content=body,
        headers={"Authorization": "Key sandbox", "Content-Type": "application/json"},
        timeout=30,
    )
    answer.raise_for_status()
    text = answer.content.decode()
    if any(c in text for c in "'\\$") or not answer.headers.get("x-fal-request-id"):
        raise RuntimeError(f"the sandbox's answer cannot be served verbatim by nginx: {text}")
    port = free_port()
    conf = workdir / "stub-nginx.conf"
    conf.write_text(
        _STUB_CONF.format(
            # A root master would start its worker as "nobody", who cannot read the workdir.
            user="user root;\n" if os.geteuid() == 0 else "",
            workdir=workdir,
            port=port,
            request_id=answer.headers["x-fal-request-id"],
            body=text,
        )
    )
    args = [binary, "-p", str(workdir), "-e", str(workdir / "stub.log"), "-c", str(conf)]
    proc, log = _spawn("stub", args, workdir)
    url = f"http://127.0.0.1:{port}"
    wait_http(url, proc, log)
    return Service("stub", url, proc, log)


def start_passthrough(workdir: Path, upstream: str, mode: str = "sync") -> Service:
    """``bench/passthrough.py --mode mode``: ``passthrough`` (sync) or ``passthrough-queue``."""
    name = "passthrough" if mode == "sync" else f"passthrough-{mode}"
    port = free_port()
    proc, log = _spawn(
        name,
        [
            sys.executable,
            str(BENCH_DIR / "passthrough.py"),
            "--port",
            str(port),
            "--upstream",
            upstream,
            "--mode",
            mode,
        ],
        workdir,
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/v1/none", proc, log)  # 405/404: up
    return Service(name, url, proc, log)


@dataclass
class Gateway:
    service: Service
    redis: EmbeddedRedis
    mode: str
    key_id: str = ""
    key: str = ""

    @property
    def url(self) -> str:
        return self.service.url

    def stop(self) -> None:
        self.service.stop()
        self.redis.stop()


#: Limits far above what two cores can reach, so that nothing is ever refused (a 429 or 503
#: would be cheaper than a real request and flatter the gateway) while every check still runs.
GENEROUS_KEY = {
    "name": "bench",
    "budget_usd": "1000000",
    "budget_period": "monthly",
    "rpm": 1_000_000,
    "max_concurrent": 10_000,
}


def start_gateway(
    workdir: Path,
    sandbox_url: str,
    mode: str,
    *,
    workers: int = 1,
    variant: str = "",
    extra_env: dict[str, str] | None = None,
    root: Path = ROOT,
) -> Gateway:
    """``falgate serve`` in ``mode`` (``sync``/``queue``) with its own Redis, plus one key;
    ``workers`` > 1 runs that many server processes (``FALGATE_WORKERS``); ``variant`` names a
    gateway run with ``extra_env`` settings; ``root`` is the checkout whose code it runs."""
    name = f"gateway-{mode}" if workers == 1 else f"gateway-{mode}-{workers}w"
    name += f"-{variant}" if variant else ""
    data_dir = workdir / name
    data_dir.mkdir(parents=True, exist_ok=True)
    store = EmbeddedRedis(data_dir / "redis", persist=False)
    store.start()
    port = free_port()
    env = {
        **os.environ,
        "FALGATE_HOST": "127.0.0.1",
        "FALGATE_PORT": str(port),
        "FALGATE_DATA_DIR": str(data_dir),
        "FALGATE_REDIS_URL": store.url,
        "FALGATE_SANDBOX_URL": sandbox_url,
        "FALGATE_ADMIN_TOKEN": ADMIN_TOKEN,
        "FALGATE_UPSTREAM_MODE": mode,
        # The global upstream gate must not queue requests at concurrency 64.
        "FALGATE_UPSTREAM_MAX_CONCURRENT": "1000",
        "FALGATE_DEFAULT_RPM": "1000000",
        "FALGATE_DEFAULT_MAX_CONCURRENT": "10000",
        "FALGATE_WORKERS": str(workers),
        **(extra_env or {}),
    }
    for variable in ("FAL_KEY", "FALGATE_FAL_KEY"):
        env.pop(variable, None)
    try:
        proc, log = _spawn(name, [*falgate_command(), "serve"], data_dir, env, root=root)
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/healthz", proc, log)
        deadline = time.monotonic() + 60
        while log.read_text().count("Application startup complete") < workers:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: not every worker started:\n{_tail(log)}")
            time.sleep(0.1)
    except BaseException:
        store.stop()
        raise
    gateway = Gateway(Service(name, url, proc, log), store, mode)
    response = httpx.post(
        f"{url}/admin/keys",
        json=GENEROUS_KEY,
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=10,
    )
    if response.status_code != 201:
        gateway.stop()
        raise RuntimeError(f"could not create the benchmark key: {response.text}")
    gateway.key_id, gateway.key = response.json()["id"], response.json()["key"]
    return gateway


def rss_kib(pid: int) -> int:
    """Resident set size (``VmRSS``) of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tree(pid: int) -> list[int]:
    """A process and its live descendants (the workers of ``--workers N``)."""
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        with contextlib.suppress(OSError, ValueError):
            for task in Path(f"/proc/{current}/task").iterdir():
                pending.extend(int(child) for child in (task / "children").read_text().split())
    return found


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of a process and of its live descendants (the workers of ``--workers N``)."""
    total = 0.0
    for current in _tree(pid):
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += cpu_seconds(current)
    return total


def tree_wakeups(pid: int) -> int:
    """How often a process and its descendants went to sleep waiting and were woken again:
    the voluntary context switches of all their threads (``/proc/<pid>/task/*/status``)."""
    total = 0
    for current in _tree(pid):
        with contextlib.suppress(OSError, ValueError):
            for task in Path(f"/proc/{current}/task").iterdir():
                for line in (task / "status").read_text().splitlines():
                    if line.startswith("voluntary_ctxt_switches:"):
                        total += int(line.split()[1])
    return total


def reads_processed(store: EmbeddedRedis) -> int:
    """Redis's count of read events from clients (``INFO stats``): one per round trip."""
    client = redis.Redis.from_url(store.url)
    try:
        return int(client.info("stats")["total_reads_processed"])
    finally:
        client.close()


def script_names() -> dict[str, str]:
    """SHA-1 of every Lua script the gateway loads -> its file name (EVALSHA's first argument)."""
    names = {}
    for path in (ROOT / "app").rglob("*.lua"):
        text = path.read_text(encoding="utf-8")
        names[hashlib.sha1(text.encode()).hexdigest()] = path.name
        # A script may have a prelude of the same package prepended (``LuaScript(prelude=)``).
        for prelude in path.parent.glob("*.lua"):
            if prelude != path:
                joined = prelude.read_text(encoding="utf-8") + "\n" + text
                names[hashlib.sha1(joined.encode()).hexdigest()] = path.name
    # The request path runs a money script and the upstream gate's as one composite script
    # (``app.metering.lua.Composite``): named "gate+admit.lua" and so on.
    gate = (ROOT / "app/ratelimit/upstream_gate.lua").read_text(encoding="utf-8")
    clock = (ROOT / "app/metering/clock.lua").read_text(encoding="utf-8")
    for path in (ROOT / "app/metering").glob("*.lua"):
        money = clock + "\n" + path.read_text(encoding="utf-8")
        names[Composite.of([money, gate]).sha] = f"{path.name}+gate"
        names[Composite.of([gate, money]).sha] = f"gate+{path.name}"
    return names


class CommandCounter:
    """Counts the commands Redis receives from clients while it runs (``MONITOR``).

    Each command a client sends is one round trip (the gateway does not pipeline on the request
    path); ``EVALSHA`` is counted per script. Commands that Lua scripts run inside Redis show as
    client ``lua`` and are counted apart, as ``in_scripts``.
    """

    def __init__(self, store: EmbeddedRedis) -> None:
        self.store = store
        self.commands: Counter[str] = Counter()
        self.in_scripts = 0
        self._scripts = script_names()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._error: BaseException | None = None

    def __enter__(self) -> CommandCounter:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("MONITOR did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        # Give Redis a moment to flush what it already executed, then stop.
        time.sleep(0.3)
        self._stop.set()
        self._thread.join(10)
        if self._error is not None:
            raise RuntimeError("MONITOR failed") from self._error

    @property
    def total(self) -> int:
        return sum(self.commands.values())

    def _run(self) -> None:
        try:
            with socket.create_connection(("127.0.0.1", self.store.port), timeout=5) as sock:
                sock.sendall(_resp("AUTH", self.store.password) + _resp("MONITOR"))
                sock.settimeout(0.2)
                buffer = b""
                while not self._stop.is_set():
                    try:
                        chunk = sock.recv(1 << 16)
                    except TimeoutError:
                        continue
                    if not chunk:
                        break
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\r\n")
                    for line in lines:
                        self._line(line.decode("utf-8", "replace"))
        except BaseException as exc:  # reported by __exit__
            self._error = exc
            self._ready.set()

    def _line(self, line: str) -> None:
        if line == "+OK":
            self._ready.set()
            return
        if not line.startswith("+") or "[" not in line:
            return
        client = line[line.index("[") + 1 : line.index("]")]
        parts = line[line.index("]") + 1 :].split('"')
        # parts: ['', CMD, ' ', ARG1, ' ', ARG2, ...]
        command = parts[1].upper() if len(parts) > 1 else "?"
        if client.endswith("lua"):
            self.in_scripts += 1
            return
        if command in ("EVALSHA", "EVAL") and len(parts) > 3:
            script = parts[3] if command == "EVALSHA" else hashlib.sha1(parts[3].encode())
            sha = script if isinstance(script, str) else script.hexdigest()
            command = f"{command} {self._scripts.get(sha, sha[:12])}"
        self.commands[command] += 1


def _resp(*args: str) -> bytes:
    out = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def ledger_summary(store: EmbeddedRedis, key_id: str) -> dict[str, Any]:
    """Ledger events by kind for one key, and the holds and in-flight slots still open."""
    client = redis.Redis.from_url(store.url, decode_responses=True)
    try:
        events: Counter[str] = Counter()
        stream = keyspace.ledger(key_id)
        start = "-"
        while True:
            page: list[tuple[str, dict[str, str]]] = cast(
                Any, client.xrange(stream, min=start, max="+", count=10_000)
            )
            if not page:
                break
            for _, entry in page:
                events[entry.get("event", "?")] += 1
            start = "(" + page[-1][0]
            if len(page) < 10_000:
                break
        open_holds: dict[str, str] = cast(Any, client.hgetall(keyspace.holds(key_id)))
        return {
            "hold": events["hold"],
            "settle": events["settle"],
            "release": events["release"],
            "other": sum(v for k, v in events.items() if k not in ("hold", "settle", "release")),
            "open_holds": len(open_holds),
            "in_flight": int(client.hlen(keyspace.inflight(key_id))),
            "open_hold_records": dict(list(open_holds.items())[:5]),  # a few, to diagnose
        }
    finally:
        client.close()


def make_workdir(base: Path | None) -> Path:
    """A fresh directory for logs and Redis data (under ``base`` or the system temp dir)."""
    import tempfile

    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="falgate-bench-", dir=base))
    return Path(tempfile.mkdtemp(prefix="falgate-bench-"))


def remove_workdir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
