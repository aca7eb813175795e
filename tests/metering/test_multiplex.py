"""The request path's pipelined Redis connection (``app.metering.multiplex``), against a real
``redis-server``: replies reach their own callers under concurrency, one turn's commands
travel in one write, errors are redis-py's classes, and a stalled, killed or restarted Redis
gives the errors the money path maps to 503, then works again without a new client.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
import redis.exceptions

from app.errors import Unavailable
from app.metering.lua import store_errors
from app.metering.multiplex import MultiplexedConnection, scripts_client
from app.redis import EmbeddedRedis
from app.settings import Settings


def _connection(
    server: EmbeddedRedis, *, password: str | None = None, over: str = "tcp"
) -> MultiplexedConnection:
    """Over loopback TCP, or over the embedded server's Unix socket (``over="unix"``)."""
    return MultiplexedConnection(
        "127.0.0.1",
        server.port,
        path=str(server.socket_path) if over == "unix" else None,
        username=None,
        password=server.password if password is None else password,
        db=0,
        connect_timeout_s=2.0,
        reply_timeout_s=0.5,
    )


@pytest.fixture
def server(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    own = EmbeddedRedis(tmp_path / "redis", persist=False)
    own.start()
    yield own
    own.stop()


@pytest.fixture(params=["tcp", "unix"])
async def conn(
    server: EmbeddedRedis, request: pytest.FixtureRequest
) -> AsyncIterator[MultiplexedConnection]:
    assert server.socket_path is not None
    connection = _connection(server, over=request.param)
    yield connection
    await connection.aclose()


async def test_concurrent_callers_each_get_their_own_reply(conn: MultiplexedConnection) -> None:
    async def one(i: int) -> str:
        await conn.execute("SET", f"k{i}", f"v{i}")
        return str(await conn.execute("GET", f"k{i}"))

    assert await asyncio.gather(*(one(i) for i in range(300))) == [f"v{i}" for i in range(300)]


async def test_one_turn_of_commands_is_one_read_for_redis(
    conn: MultiplexedConnection, server: EmbeddedRedis
) -> None:
    await conn.execute("PING")
    probe = redis.Redis.from_url(server.url)
    try:
        before = int(probe.info("stats")["total_reads_processed"])
        replies = await asyncio.gather(*(conn.execute("INCR", "n") for _ in range(50)))
        after = int(probe.info("stats")["total_reads_processed"])
    finally:
        probe.close()
    assert sorted(replies) == list(range(1, 51))
    # 50 commands in one write: Redis read them in one go (plus the probe's second INFO).
    assert after - before - 1 <= 2, after - before


async def test_errors_are_redis_py_classes(conn: MultiplexedConnection) -> None:
    with pytest.raises(redis.exceptions.NoScriptError):
        await conn.evalsha("0" * 40, 0)
    await conn.execute("SET", "s", "text")
    with pytest.raises(redis.exceptions.ResponseError, match="not an integer"):
        await conn.execute("INCR", "s")
    sha = await conn.script_load("return {1, redis.error_reply('inner'), 'x'}")
    reply = await conn.evalsha(sha, 0)
    assert reply[0] == 1 and reply[2] == "x"
    assert isinstance(reply[1], redis.exceptions.ResponseError) and str(reply[1]) == "inner"
    assert await conn.execute("PING") == "PONG"  # the connection is still in step


@pytest.mark.parametrize("over", ["tcp", "unix"])
async def test_a_wrong_password_is_a_connection_error(server: EmbeddedRedis, over: str) -> None:
    wrong = _connection(server, password="not-the-password", over=over)
    try:
        with pytest.raises(redis.exceptions.ConnectionError):
            await wrong.execute("PING")
    finally:
        await wrong.aclose()


async def test_a_stalled_redis_times_out_then_the_connection_recovers(
    conn: MultiplexedConnection, server: EmbeddedRedis
) -> None:
    await conn.execute("PING")
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        results = await asyncio.gather(
            *(conn.execute("INCR", "stalled") for _ in range(5)), return_exceptions=True
        )
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
    assert all(isinstance(r, redis.exceptions.RedisError) for r in results), results
    # One timer per connection: the oldest command times out, the rest fail with it.
    assert isinstance(results[0], redis.exceptions.TimeoutError), results
    assert all(type(r) is redis.exceptions.ConnectionError for r in results[1:]), results
    with pytest.raises(Unavailable), store_errors():  # how the money path sees it
        raise results[0]
    assert await conn.execute("PING") == "PONG"  # a new connection, no new client


@pytest.mark.parametrize("over", ["tcp", "unix"])
async def test_a_killed_and_restarted_redis_fails_fast_then_works(
    tmp_path: Path, over: str
) -> None:
    server = EmbeddedRedis(tmp_path / "restart", persist=False)
    server.start()
    conn = _connection(server, over=over)
    try:
        await conn.execute("SET", "a", "1")
        assert server.process is not None
        server.process.kill()
        server.process.wait()
        with pytest.raises(redis.exceptions.ConnectionError):
            await conn.execute("GET", "a")
        with pytest.raises(redis.exceptions.ConnectionError):  # refused at once
            await conn.execute("GET", "a")
        server.start()  # same port and password
        assert await conn.execute("PING") == "PONG"
    finally:
        await conn.aclose()
        server.stop()


async def test_only_a_single_server_over_plain_tcp_or_a_unix_socket_is_multiplexed(
    server: EmbeddedRedis, tmp_path: Path
) -> None:
    settings = Settings(data_dir=tmp_path)
    plain = aioredis.Redis.from_url(server.tcp_url)
    unix = aioredis.Redis.from_url(server.url)
    tls = aioredis.Redis.from_url(server.tcp_url.replace("redis://", "rediss://"))
    try:
        for client, path in ((plain, None), (unix, str(server.socket_path))):
            chosen = scripts_client(client, settings)
            assert isinstance(chosen, MultiplexedConnection)
            assert chosen.path == path
            assert await chosen.execute("PING") == "PONG"  # the URL's password, port or path
            await chosen.aclose()
        assert scripts_client(tls, settings) is tls
        off = Settings(data_dir=tmp_path, redis_multiplex=False)
        assert scripts_client(plain, off) is plain
    finally:
        for client in (plain, unix, tls):
            await client.aclose()
