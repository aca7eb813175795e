"""One pipelined connection for the request path's scripts (issue 15).

redis-py gives every command a connection of its own for the time of the round trip: it takes
one from the pool (a lock, a liveness probe of the socket, observability events), writes,
reads through asyncio streams and gives it back. Measured here, that is ~120 µs of CPU per
command, where the network round trip itself costs ~45 µs. The request path sends a few
script calls per request and nothing else, so it gets a cheaper shape, the one Redis's own
pipelining is made for: every process keeps ONE connection for them, commands are written as
they come (the commands of one event-loop turn in one write) and replies, which Redis sends in
order, are matched to their callers in order. Parsing is hiredis's, errors are redis-py's
classes, so callers cannot tell the two apart.

Only for a single Redis over TCP without TLS or over a Unix socket (the embedded Redis's
default); every other form (cluster, sentinel, TLS) keeps redis-py (:func:`scripts_client`).
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any, Protocol, cast

import hiredis
import redis.asyncio as aioredis
import redis.exceptions
from redis._parsers.base import BaseParser

from app.settings import Settings

_ARGS = str | int | float


class ScriptClient(Protocol):
    """What :func:`app.metering.lua.run_together` needs: redis-py's client, or this module's."""

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: _ARGS) -> Any: ...

    async def script_load(self, script: str) -> Any: ...


def _packed(command: tuple[_ARGS, ...]) -> bytes:
    # hiredis's stub types its argument as a tuple of one element.
    packed: bytes = hiredis.pack_command(cast(Any, command))
    return packed


def _error(reply: hiredis.ReplyError) -> redis.exceptions.ResponseError:
    """redis-py's class for an error reply (``NoScriptError`` for NOSCRIPT, and so on)."""
    error = BaseParser.parse_error(str(reply))  # type: ignore[no-untyped-call]
    assert isinstance(error, redis.exceptions.ResponseError)
    return error


def _converted(reply: Any) -> Any:
    """Error replies inside an array as redis-py's classes (a composite script's parts)."""
    if isinstance(reply, list):
        return [_error(r) if isinstance(r, hiredis.ReplyError) else r for r in reply]
    return reply


class _Protocol(asyncio.Protocol):
    def __init__(self, reply_timeout_s: float) -> None:
        self.reader = hiredis.Reader(encoding="utf-8", errors="replace")
        # Callers in the order of their commands, with when their reply is due.
        self.waiting: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self.outgoing: list[bytes] = []  # commands of this turn of the event loop
        self.transport: asyncio.Transport | None = None
        self.lost: BaseException | None = None
        self.reply_timeout_s = reply_timeout_s
        self._watchdog: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def send(self, loop: asyncio.AbstractEventLoop, command: bytes) -> asyncio.Future[Any]:
        """Queue ``command`` for this turn's write; its reply, when it comes, is the future's."""
        future = loop.create_future()
        due = loop.time() + self.reply_timeout_s
        self.waiting.append((future, due))
        if self._watchdog is None:
            self._watchdog = loop.call_at(due, self._watch)
        if not self.outgoing:
            loop.call_soon(self.flush)
        self.outgoing.append(command)
        return future

    def _watch(self) -> None:
        """Replies come in order, so only the oldest unanswered command can be late: one timer
        per connection instead of one per command."""
        self._watchdog = None
        if not self.waiting or self.lost is not None:
            return
        future, due = self.waiting[0]
        loop = future.get_loop()
        if loop.time() < due:
            self._watchdog = loop.call_at(due, self._watch)
            return
        self.waiting.popleft()
        if not future.done():
            future.set_exception(redis.exceptions.TimeoutError("Timeout reading from Redis"))
        self.fail(redis.exceptions.ConnectionError("an earlier reply timed out"))

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            if not self.waiting:  # pragma: no cover - Redis sent a reply nobody asked for
                self.fail(redis.exceptions.ConnectionError("unexpected reply from Redis"))
                return
            future, _ = self.waiting.popleft()
            if not future.done():  # a caller that went away: its reply is dropped
                future.set_result(reply)

    def flush(self) -> None:
        """Write every command queued in this turn of the event loop, in one write."""
        data, self.outgoing = b"".join(self.outgoing), []
        if self.transport is not None and self.lost is None:
            self.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(redis.exceptions.ConnectionError(f"Redis closed the connection: {exc}"))

    def fail(self, exc: BaseException) -> None:
        """Every caller still waiting gets ``exc``; the connection is closed for good."""
        self.lost = exc
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        while self.waiting:
            future, _ = self.waiting.popleft()
            if not future.done():
                future.set_exception(exc)
        if self.transport is not None:
            self.transport.close()


class MultiplexedConnection:
    """One connection to a single Redis, shared by every caller of this process.

    A reply that does not come within ``reply_timeout_s`` raises redis-py's ``TimeoutError``
    and the connection is closed, as redis-py does (whatever the other callers were waiting
    for fails with ``ConnectionError``: their commands may or may not have run); the next
    command connects again.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        path: str | None = None,
        username: str | None,
        password: str | None,
        db: int,
        connect_timeout_s: float,
        reply_timeout_s: float,
    ) -> None:
        self.host, self.port, self.path = host, port, path
        self._hello: list[tuple[_ARGS, ...]] = []
        if password:
            self._hello.append(("AUTH", username, password) if username else ("AUTH", password))
        if db:
            self._hello.append(("SELECT", db))
        self.connect_timeout_s = connect_timeout_s
        self.reply_timeout_s = reply_timeout_s
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None
        self._closed = False

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: _ARGS) -> Any:
        return await self.execute("EVALSHA", sha, numkeys, *keys_and_args)

    async def script_load(self, script: str) -> Any:
        return await self.execute("SCRIPT", "LOAD", script)

    async def execute(self, *command: _ARGS) -> Any:
        protocol = self._protocol
        if protocol is None or protocol.lost is not None:
            protocol = await self._connected()
        reply = await protocol.send(asyncio.get_running_loop(), _packed(command))
        if isinstance(reply, hiredis.ReplyError):
            raise _error(reply)
        return _converted(reply)

    async def _connected(self) -> _Protocol:
        if self._closed:
            raise redis.exceptions.ConnectionError("the connection was closed")
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
        connecting = self._connecting
        try:
            return await asyncio.shield(connecting)
        finally:
            if connecting.done() and self._connecting is connecting:
                self._connecting = None

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        reply_timeout_s = self.reply_timeout_s
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                if self.path is not None:
                    _, protocol = await loop.create_unix_connection(
                        lambda: _Protocol(reply_timeout_s), self.path
                    )
                else:
                    _, protocol = await loop.create_connection(
                        lambda: _Protocol(reply_timeout_s), self.host, self.port
                    )
        except (OSError, TimeoutError) as exc:
            raise redis.exceptions.ConnectionError(
                f"Error connecting to {self.path or f'{self.host}:{self.port}'}: {exc}"
            ) from exc
        try:
            assert protocol.transport is not None
            replies = [protocol.send(loop, _packed(command)) for command in self._hello]
            async with asyncio.timeout(self.connect_timeout_s):
                for future in replies:
                    if isinstance(reply := await future, hiredis.ReplyError):
                        raise redis.exceptions.AuthenticationError(str(reply))
        except BaseException:
            protocol.fail(redis.exceptions.ConnectionError("the connection did not open"))
            raise
        self._protocol = protocol
        return protocol

    async def aclose(self) -> None:
        self._closed = True
        if self._protocol is not None:
            self._protocol.fail(redis.exceptions.ConnectionError("the connection was closed"))


def scripts_client(client: Any, settings: Settings) -> ScriptClient:
    """The client the request path runs its scripts on: a :class:`MultiplexedConnection` to
    the same server as ``client`` when that is a single Redis over plain TCP or a Unix socket
    (and ``FALGATE_REDIS_MULTIPLEX`` is on), else ``client`` itself."""
    if not settings.redis_multiplex or type(client) is not aioredis.Redis:
        return cast(ScriptClient, client)
    pool = client.connection_pool
    if type(pool) not in (aioredis.ConnectionPool, aioredis.BlockingConnectionPool):
        return cast(ScriptClient, client)  # a sentinel's pool
    unix = pool.connection_class is aioredis.UnixDomainSocketConnection
    if pool.connection_class is not aioredis.Connection and not unix:
        return cast(ScriptClient, client)  # TLS
    kwargs = pool.connection_kwargs
    return MultiplexedConnection(
        kwargs.get("host", "localhost"),
        int(kwargs.get("port", 6379)),
        path=str(kwargs["path"]) if unix else None,
        username=kwargs.get("username"),
        password=kwargs.get("password"),
        db=int(kwargs.get("db", 0) or 0),
        connect_timeout_s=settings.redis_connect_timeout_s,
        reply_timeout_s=settings.redis_socket_timeout_s,
    )


__all__ = ["MultiplexedConnection", "ScriptClient", "scripts_client"]
