"""Lua scripts kept as ``.lua`` files beside the Python that runs them, and Redis error mapping.

A script's text is read once per process; it runs with ``EVALSHA`` and is loaded again on
``NOSCRIPT`` (a restarted or failed-over Redis has an empty script cache).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
import redis.exceptions as redis_exceptions

from app.errors import Unavailable
from app.metering.multiplex import ScriptClient
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
        self.source = "\n".join(script_text(package, part) for part in (*prelude, name))
        self._script = client.register_script(self.source)

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


@dataclass(frozen=True)
class Composite:
    """Several scripts as ONE script: each part runs as a Lua function of its own ``KEYS`` and
    ``ARGV``, one after the other, and the reply is the list of the parts' replies (an error
    of one part, raised or returned, is that part's reply and does not stop the others).

    Only for a Redis where every key is on one server: the parts' keys may hash to different
    Cluster slots.
    """

    source: str
    sha: str

    @classmethod
    def of(cls, sources: Sequence[str]) -> Composite:
        functions = [
            f"local function part_{i}(KEYS, ARGV)\n{text}\nend\n"
            for i, text in enumerate(sources, start=1)
        ]
        names = ", ".join(f"part_{i}" for i in range(1, len(sources) + 1))
        source = "".join(functions) + _COMPOSITE_DRIVER.replace("PARTS", names)
        return cls(source, hashlib.sha1(source.encode()).hexdigest())

    @staticmethod
    def arguments(calls: Sequence[ScriptCall]) -> tuple[list[str], list[str | int | float]]:
        """The composite's ``KEYS`` and ``ARGV`` for these calls: ARGV starts with each part's
        number of keys and of arguments."""
        keys: list[str] = []
        args: list[str | int | float] = []
        for call in calls:
            keys.extend(call.keys)
            args.extend((len(call.keys), len(call.args)))
        for call in calls:
            args.extend(call.args)
        return keys, args


# Runs each part with its slice of KEYS and ARGV (see ``Composite.arguments``). ``pcall`` keeps
# one part's error to its own reply, as separate scripts in a pipeline would; ``false`` stands
# for a part that returned nothing (a nil would end the Lua array early).
_COMPOSITE_DRIVER = """
local parts = {PARTS}
local replies = {}
local key_at, arg_at = 0, 2 * #parts
for i = 1, #parts do
  local key_count, arg_count = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  local keys, argv = {}, {}
  for j = 1, key_count do keys[j] = KEYS[key_at + j] end
  for j = 1, arg_count do argv[j] = ARGV[arg_at + j] end
  key_at, arg_at = key_at + key_count, arg_at + arg_count
  local ok, reply = pcall(parts[i], keys, argv)
  if not ok then
    if type(reply) ~= 'table' or not reply.err then
      reply = {err = tostring(reply)}
    end
  elseif reply == nil then
    reply = false
  end
  replies[i] = reply
end
return replies
"""

_composites: dict[tuple[str, ...], Composite] = {}


def composite_of(calls: Sequence[ScriptCall]) -> Composite:
    """The composite script of these calls' scripts, in this order (built once per process)."""
    names = tuple(call.script.sha for call in calls)
    found = _composites.get(names)
    if found is None:
        found = _composites[names] = Composite.of([call.script.source for call in calls])
    return found


async def _evalsha(client: Any, sha: str, source: str, keys: list[str], args: list[Any]) -> Any:
    try:
        return await client.evalsha(sha, len(keys), *keys, *args)
    except redis_exceptions.NoScriptError:  # did not run: a restarted Redis, load it
        await client.script_load(source)
        return await client.evalsha(sha, len(keys), *keys, *args)


async def _run_single(client: Any, call: ScriptCall) -> Any:
    try:
        return await _evalsha(client, call.script.sha, call.script.source, call.keys, call.args)
    except redis_exceptions.ResponseError as exc:
        return exc


async def _run_composite(client: Any, calls: Sequence[ScriptCall]) -> list[Any]:
    composite = composite_of(calls)
    keys, args = Composite.arguments(calls)
    return list(await _evalsha(client, composite.sha, composite.source, keys, args))


async def run_together(redis: ScriptClient | Any, *calls: ScriptCall) -> list[Any]:
    """Run several scripts in ONE round trip and ONE command.

    ``redis``: redis-py's client, or the request path's pipelined connection
    (:mod:`app.metering.multiplex`). Each script keeps its own keys, arguments and reply, and
    none depends on another's outcome. On a single Redis they run as one composite script
    (:class:`Composite`): one ``EVALSHA``, one command for Redis to parse and run instead of a
    pipeline of several (and atomic together). On a cluster, where they may live on different
    slots and nodes, they are sent concurrently instead (one round trip of latency). Returns
    each script's reply, or the ``ResponseError`` it answered with. Raises ``Unavailable``
    when Redis cannot be reached.
    """
    with store_errors():
        if isinstance(redis, aioredis.RedisCluster):
            replies = list(await asyncio.gather(*(_one(c) for c in calls)))
            for i, reply in enumerate(replies):
                if isinstance(reply, redis_exceptions.NoScriptError):
                    try:
                        replies[i] = await calls[i].script(calls[i].keys, calls[i].args)
                    except redis_exceptions.ResponseError as exc:
                        replies[i] = exc
        elif len(calls) == 1:
            replies = [await _run_single(redis, calls[0])]
        else:
            replies = await _run_composite(redis, calls)
    for reply in replies:
        if isinstance(reply, redis_exceptions.ResponseError) and is_transient(reply):
            record_redis_error("metering")
    return replies
