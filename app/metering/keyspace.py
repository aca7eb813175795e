"""Every Redis key metering and rate limiting use, in one place.

Per API key (all under the hash tag ``{k:<id>}``, so one key's state is one Cluster slot and
one Lua script can touch all of it):

- ``{k:<id>}:meta``      hash, written by the keys service; read (never cached) by the scripts
- ``{k:<id>}:budget``    hash: ``held`` (micro-dollars currently held), and settled spend per
  period: ``total``, ``d:<day start epoch>``, ``m:<month start epoch>``
- ``{k:<id>}:holds``     hash: request id -> JSON hold (amount, pixels, unit price, model,
  operation, endpoint, placing process, periods, fal request id, state: ``held`` (fal has not
  accepted the job) | ``submitted`` (fal's id recorded) | ``unresolved`` (the request path
  gave up after fal accepted it; the resolver asks fal))
- ``{k:<id>}:leases``    sorted set: request id -> lease deadline (ms, Redis clock) of each open
  hold; renewed while its request lives, so the resolver finds the abandoned ones by score
- ``{k:<id>}:req:<request id>``  hash: the request record behind ``GET /v1/requests/{id}``
  (status, operation, model, fal's id, cost, images); also the tombstone that refuses an
  admission the gateway already gave up on
- ``{k:<id>}:inflight``  hash: request id -> owning process id (``max_concurrent`` slots)
- ``{k:<id>}:gcra``      string: GCRA theoretical arrival time, microseconds since the epoch
- ``{k:<id>}:ledger``    stream: the append-only ledger (hold / settle / release entries)
- ``{k:<id>}:idem:<sha256 of the Idempotency-Key>``  hash: a stored first response

Global:

- ``falgate:keys``            set of every key id (keys service)
- ``falgate:proc:<process>``  a gateway process's lease (string with a TTL, renewed by its sweeper)
- ``{falgate:gate}:*``        the upstream concurrency gate (see ``app.ratelimit.upstream_gate``)
"""

from __future__ import annotations

import hashlib

KEY_IDS = "falgate:keys"


def tag(key_id: str) -> str:
    return f"{{k:{key_id}}}"


def meta(key_id: str) -> str:
    return f"{tag(key_id)}:meta"


def budget(key_id: str) -> str:
    return f"{tag(key_id)}:budget"


def holds(key_id: str) -> str:
    return f"{tag(key_id)}:holds"


def inflight(key_id: str) -> str:
    return f"{tag(key_id)}:inflight"


def gcra(key_id: str) -> str:
    return f"{tag(key_id)}:gcra"


def ledger(key_id: str) -> str:
    return f"{tag(key_id)}:ledger"


def leases(key_id: str) -> str:
    return f"{tag(key_id)}:leases"


def request_record(key_id: str, request_id: str) -> str:
    return f"{tag(key_id)}:req:{request_id}"


def idempotency(key_id: str, idempotency_key: str) -> str:
    digest = hashlib.sha256(idempotency_key.encode()).hexdigest()
    return f"{tag(key_id)}:idem:{digest}"


def process_lease(process_id: str) -> str:
    return f"falgate:proc:{process_id}"
