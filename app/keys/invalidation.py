"""Key changes apply at once on every gateway process: a listener on Redis pub/sub.

``KeyService.update``/``revoke`` publish the key id on ``falgate:keys:changed``; every process
drops that key from its authentication cache when it hears it. The cache is used only while
the subscription is up: when the listener loses Redis it turns the cache off (every request
reads the key from Redis) until it has subscribed again. The remaining window is the delivery
of one pub/sub message (well under a millisecond on a LAN). On Redis Cluster, where redis-py's
asyncio client has no pub/sub, the listener is not started and the cache stays off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import redis.asyncio as aioredis

from app.keys.service import KEY_CHANGES, KeyService
from app.redis import REDIS_ERRORS

log = logging.getLogger("falgate.keys")

_RETRY_S = 0.5
_POLL_S = 1.0


class KeyChangeListener:
    """Subscribes to key changes and keeps ``KeyService``'s cache honest."""

    def __init__(self, redis: aioredis.Redis, keys: KeyService) -> None:
        self.redis = redis
        self.keys = keys
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="key-change-listener")

    async def stop(self) -> None:
        task, self._task = self._task, None
        self.keys.enable_cache(False)
        if task is not None:
            task.cancel()
            await asyncio.wait({task}, timeout=5)

    async def _run(self) -> None:
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(KEY_CHANGES)
                # The subscription is confirmed by its first message: from then on every
                # change is heard, so the cache may be used.
                while True:
                    message = await pubsub.get_message(timeout=_POLL_S)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        self.keys.enable_cache(True)
                    elif message["type"] == "message":
                        self.keys.forget(str(message["data"]))
            except asyncio.CancelledError:
                raise
            except REDIS_ERRORS:
                log.warning("lost the key-change subscription; authenticating without a cache")
            except Exception:
                log.exception("key-change listener failed")
            finally:
                self.keys.enable_cache(False)
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(_RETRY_S)


__all__ = ["KeyChangeListener"]
