"""The holds outstanding across every gateway process, for ``falgate_holds_outstanding``.

Counting them means visiting every key (``HLEN {k:<id>}:holds`` and the ``held`` field of
``{k:<id>}:budget``, pipelined; on a Redis Cluster the pipeline fans out per node). That walk is
done by ONE process - the active ledger drainer, once per drain cycle - which stores the result
in ``falgate:metrics:holds`` (``count``, ``micro``, ``at_ms``). ``/metrics`` reads that snapshot:
one ``HMGET`` per scrape, whatever the number of keys. Only when no snapshot is fresh (no
drainer runs anywhere) does a scrape count for itself.
"""

from __future__ import annotations

import time
from typing import Any

from app.metering import keyspace
from app.metering.lua import text
from app.ops.metrics import HoldsSnapshot

SNAPSHOT_KEY = "falgate:metrics:holds"
_BATCH = 500


async def outstanding_holds(redis: Any) -> HoldsSnapshot:
    """Open holds and the amount they hold, summed over every key (walks every key)."""
    key_ids = sorted({text(k) async for k in redis.sscan_iter(keyspace.KEY_IDS)})
    count = micro = 0
    for start in range(0, len(key_ids), _BATCH):
        batch = key_ids[start : start + _BATCH]
        async with redis.pipeline(transaction=False) as pipe:
            for key_id in batch:
                pipe.hlen(keyspace.holds(key_id))
                pipe.hget(keyspace.budget(key_id), "held")
            replies = await pipe.execute()
        for i in range(len(batch)):
            count += int(replies[2 * i])
            held = replies[2 * i + 1]
            micro += int(text(held)) if held is not None else 0
    return HoldsSnapshot(count=count, micro=micro)


async def publish_holds_snapshot(redis: Any) -> HoldsSnapshot:
    """Count the holds (walking every key) and store the result for every scrape to read."""
    snapshot = await outstanding_holds(redis)
    await redis.hset(
        SNAPSHOT_KEY,
        mapping={
            "count": snapshot.count,
            "micro": snapshot.micro,
            "at_ms": int(time.time() * 1000),
        },
    )
    return snapshot


async def holds_from_snapshot(redis: Any, max_age_s: float) -> HoldsSnapshot:
    """The stored snapshot when younger than ``max_age_s``; otherwise counted now."""
    count, micro, at_ms = await redis.hmget(SNAPSHOT_KEY, "count", "micro", "at_ms")
    if at_ms is not None and time.time() * 1000 - int(text(at_ms)) <= max_age_s * 1000:
        return HoldsSnapshot(count=int(text(count)), micro=int(text(micro)))
    return await outstanding_holds(redis)
