"""Lua scripts kept as ``.lua`` files beside the Python that runs them, and Redis error mapping.

A script's text is read once per process; it runs with ``EVALSHA`` and is loaded again on
``NOSCRIPT`` (a restarted or failed-over Redis has an empty script cache).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from functools import cache
from importlib import resources
from typing import Any

import redis.exceptions

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

    def __init__(self, client: Any, package: str, name: str) -> None:
        self.name = name
        self._script = client.register_script(script_text(package, name))

    async def __call__(self, keys: Sequence[str], args: Sequence[str | int | float]) -> Any:
        # redis-py's script object sends EVALSHA and, on NOSCRIPT, loads the text and retries.
        return await self._script(keys=list(keys), args=list(args))
