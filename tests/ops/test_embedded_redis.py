"""The embedded private Redis (``app.redis.EmbeddedRedis``): reached over a Unix socket in its
private directory where one can be made, over loopback TCP otherwise."""

from __future__ import annotations

import contextlib
import stat
from pathlib import Path

import redis

from app.redis import EmbeddedRedis


def _pings(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_timeout=2)
    with contextlib.closing(client):
        return bool(client.ping())


def test_it_is_reached_over_a_private_unix_socket(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "r", persist=False)
    try:
        url = server.start()
        assert url.startswith("unix://") and url == server.url
        assert server.socket_path == tmp_path / "r" / "redis.sock"
        mode = server.socket_path.stat().st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) & 0o077 == 0
        assert (tmp_path / "r" / "redis.url").read_text() == url
        assert _pings(url) and _pings(server.tcp_url)
        anonymous = redis.Redis(unix_socket_path=str(server.socket_path), socket_timeout=2)
        with contextlib.closing(anonymous):  # the password is needed on the socket too
            try:
                anonymous.set("x", "1")
                raise AssertionError("the socket answered without the password")
            except redis.exceptions.AuthenticationError:
                pass
    finally:
        server.stop()


def test_a_path_too_long_for_a_socket_falls_back_to_tcp(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    server = EmbeddedRedis(deep, persist=False)
    try:
        url = server.start()
        assert server.socket_path is None
        assert url == server.tcp_url and _pings(url)
    finally:
        server.stop()


def test_a_socket_that_cannot_be_opened_falls_back_to_tcp(tmp_path: Path) -> None:
    """As on a file system that cannot hold sockets: redis-server exits, and starts again on
    loopback TCP alone."""
    blocked = tmp_path / "r" / "redis.sock"
    blocked.mkdir(parents=True)
    (blocked / "file").write_text("in the way")
    server = EmbeddedRedis(tmp_path / "r", persist=False)
    try:
        url = server.start()
        assert server.socket_path is None
        assert url == server.tcp_url and _pings(url)
        assert (tmp_path / "r" / "redis.url").read_text() == url
    finally:
        server.stop()
