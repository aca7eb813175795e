"""Lua scripts kept as ``.lua`` files beside the Python that runs them, and Redis error mapping.

A script's text is read once per process; it runs with ``EVALSHA`` and is loaded again on
``NOSCRIPT`` (a restarted or failed-over Redis has an empty script cache).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
import redis.exceptions as redis_exceptions

from app.errors import Unavailable
from app.ops.metrics import record_redis_error

#: Redis replies meaning "not now" rather than "your command is wrong".
_TRANSIENT_REPLIES = ("LOADING", "READONLY", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "BUSY")


@cache
def script_text(package: str, name: str) -> str:
    """The text of ``<package>/<name>`` (read once per process)."""
    return resources.files(package).joinpath(name).read_text(encoding="utf-8")


def text(value: Any) -> str:
    """A reply as ``str`` whether or not the client decodes responses."""
    if isinstance(value, bytes):
        return value.decode()
    return str(value)


def optional_text(value: Any) -> str | None:
    return None if value is None else text(value)


def is_transient(exc: BaseException) -> bool:
    """Whether a Redis failure means "unreachable/unready" (503) rather than a bug."""
    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        return True
    if isinstance(exc, redis.exceptions.ResponseError):
        return str(exc).startswith(_TRANSIENT_REPLIES)
    return isinstance(exc, OSError)


@contextlib.contextmanager
def store_errors(what: str = "The metering store") -> Iterator[None]:
    """Turn an unreachable or unready Redis into ``Unavailable`` (503), keeping the cause."""
    try:
        yield
    except (redis.exceptions.RedisError, OSError) as exc:
        if not is_transient(exc):
            raise
        record_redis_error("metering")
        raise Unavailable(
            f"{what} is unavailable; nothing was charged. Try again shortly.",
            headers={"Retry-After": "1"},
        ) from exc


class LuaScript:
    """One ``.lua`` file bound to a client; ``await script(keys, args)`` runs it atomically."""

    def __init__(
        self, client: Any, package: str, name: str, *, prelude: Sequence[str] = ()
    ) -> None:
        """``prelude``: ``.lua`` files of the same package whose functions the script uses
        (e.g. ``clock.lua``), prepended to it: Redis has no ``require``."""
        self.name = name
        source = "\n".join(script_text(package, part) for part in (*prelude, name))
        self._script = client.register_script(source)

    async def __call__(self, keys: Sequence[str], args: Sequence[str | int | float]) -> Any:
        # redis-py's script object sends EVALSHA and, on NOSCRIPT, loads the text and retries.
        return await self._script(keys=list(keys), args=list(args))

    def call(self, keys: Sequence[str], args: Sequence[str | int | float]) -> ScriptCall:
        """This script with these arguments, to run together with others (:func:`run_together`)."""
        return ScriptCall(self, list(keys), list(args))

    @property
    def sha(self) -> str:
        return str(self._script.sha)


@dataclass(frozen=True)
class ScriptCall:
    script: LuaScript
    keys: list[str]
    args: list[str | int | float]


async def _one(call: ScriptCall) -> Any:
    try:
        return await call.script(call.keys, call.args)
    except redis_exceptions.ResponseError as exc:
        return exc


async def run_together(redis: Any, *calls: ScriptCall) -> list[Any]:
    """Run several scripts in ONE round trip (a non-transactional pipeline).

    Each script is still atomic on its own; they are independent and may live on different
    Cluster slots (on a cluster they are sent concurrently instead). Returns each script's
    reply, or the ``ResponseError`` it answered with. Raises ``Unavailable`` when Redis cannot
    be reached. A script missing from Redis's cache (after a restart) is loaded and run again
    alone: NOSCRIPT means it did not run.
    """
    with store_errors():
        if isinstance(redis, aioredis.RedisCluster):
            # The scripts live on different slots, usually different nodes: send them at once
            # (redis-py does not pipeline scripts on a cluster), one round trip of latency.
            replies = list(await asyncio.gather(*(_one(c) for c in calls)))
        else:
            async with redis.pipeline(transaction=False) as pipe:
                for c in calls:
                    pipe.evalsha(c.script.sha, len(c.keys), *c.keys, *c.args)
                replies = list(await pipe.execute(raise_on_error=False))
        for i, reply in enumerate(replies):
            if isinstance(reply, redis_exceptions.NoScriptError):
                try:
                    replies[i] = await calls[i].script(calls[i].keys, calls[i].args)
                except redis_exceptions.ResponseError as exc:
                    replies[i] = exc
    for reply in replies:
        if isinstance(reply, redis_exceptions.ResponseError) and is_transient(reply):
            record_redis_error("metering")
    return replies
