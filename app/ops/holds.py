"""Count the holds outstanding across every gateway process, for ``falgate_holds_outstanding``.

Read on each ``/metrics`` scrape from the metering keyspace: the number of open holds of every
key (``{k:<id>}:holds``) and the micro-dollars they hold (``{k:<id>}:budget`` field ``held``).
One pipelined round trip per batch of keys; on a Redis Cluster the pipeline fans out per node.
"""

from __future__ import annotations

from typing import Any

from app.metering import keyspace
from app.metering.lua import text
from app.ops.metrics import HoldsSnapshot

_BATCH = 500


async def outstanding_holds(redis: Any) -> HoldsSnapshot:
    """Open holds and the amount they hold, summed over every key."""
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
