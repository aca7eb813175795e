"""Idempotency-Key records against a real Redis: replay, conflict, concurrent duplicates."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from app.errors import IdempotencyConflict, InvalidRequest
from app.metering.idempotency import IdempotencyStore, IdempotencyTicket, StoredResponse
from app.metering.sweeper import Sweeper
from app.settings import Settings


@pytest.fixture
def store(r: Any, settings: Settings) -> IdempotencyStore:
    return IdempotencyStore(r, settings, "proc_a", wait_timeout_s=10, poll_interval_s=0.01)


async def begin(store: IdempotencyStore, body: bytes = b'{"prompt":"a fox"}', **kw: Any) -> Any:
    args: dict[str, Any] = {
        "key_id": "key_a",
        "idempotency_key": "idem-1",
        "method": "POST",
        "path": "/v1/generate",
        "body": body,
        "request_id": "req_1",
    }
    args.update(kw)
    return await store.begin(**args)


async def test_completed_request_is_replayed(store: IdempotencyStore) -> None:
    ticket = await begin(store)
    assert isinstance(ticket, IdempotencyTicket)
    await store.complete(ticket, 200, b'{"ok":true}', {"X-Cost-USD": "0.011797"})
    replay = await begin(store, request_id="req_2")
    assert replay == StoredResponse(
        200, b'{"ok":true}', {"X-Cost-USD": "0.011797", "Idempotent-Replayed": "true"}
    )


async def test_same_key_different_body_or_path_is_a_conflict(store: IdempotencyStore) -> None:
    ticket = await begin(store)
    await store.complete(ticket, 200, b"{}", {})
    with pytest.raises(IdempotencyConflict) as info:
        await begin(store, body=b'{"prompt":"a wolf"}', request_id="req_2")
    assert info.value.status_code == 409
    with pytest.raises(IdempotencyConflict):
        await begin(store, path="/v1/run/flux-dev", request_id="req_3")


async def test_keys_are_scoped_per_api_key(store: IdempotencyStore) -> None:
    await store.complete(await begin(store), 200, b"{}", {})
    assert isinstance(await begin(store, key_id="key_b", request_id="req_2"), IdempotencyTicket)


async def test_failed_first_attempt_frees_the_key(store: IdempotencyStore) -> None:
    ticket = await begin(store)
    await store.complete(ticket, 402, b"{}", {})
    retry = await begin(store, request_id="req_2")
    assert isinstance(retry, IdempotencyTicket)
    await store.abandon(retry)
    assert isinstance(await begin(store, request_id="req_3"), IdempotencyTicket)


async def test_concurrent_duplicates_wait_for_the_first_and_replay_it(
    store: IdempotencyStore,
) -> None:
    attempts = [asyncio.create_task(begin(store, request_id=f"req_{i}")) for i in range(20)]
    done, waiting = await asyncio.wait(attempts, return_when=asyncio.FIRST_COMPLETED)
    (first,) = done
    ticket = first.result()
    assert isinstance(ticket, IdempotencyTicket)
    await asyncio.sleep(0.05)
    assert not any(t.done() for t in waiting)  # the duplicates wait

    await store.complete(ticket, 200, b"first", {})
    replays = await asyncio.gather(*waiting)
    assert all(isinstance(r, StoredResponse) and r.body == b"first" for r in replays)


async def test_duplicate_gets_409_when_the_first_outlasts_the_wait(
    r: Any, settings: Settings
) -> None:
    store = IdempotencyStore(r, settings, "proc_a", wait_timeout_s=0.1, poll_interval_s=0.01)
    await Sweeper(r, settings, "proc_a", None).heartbeat()  # type: ignore[arg-type]
    await begin(store)
    with pytest.raises(IdempotencyConflict) as info:
        await begin(store, request_id="req_2")
    assert "in progress" in info.value.message


async def test_a_dead_owner_is_taken_over(r: Any, settings: Settings) -> None:
    quick = settings.model_copy(update={"process_lease_s": 0.0})
    dead = IdempotencyStore(r, quick, "proc_dead", wait_timeout_s=5, poll_interval_s=0.01)
    await begin(dead)  # proc_dead has no lease: it crashed mid-request
    retry = await begin(IdempotencyStore(r, quick, "proc_b", wait_timeout_s=5), request_id="req_2")
    assert isinstance(retry, IdempotencyTicket)
    assert retry.request_id == "req_2"


async def test_bad_idempotency_keys_are_refused(store: IdempotencyStore) -> None:
    for bad in ("", "x" * 256, "tab\there"):
        with pytest.raises(InvalidRequest):
            await begin(store, idempotency_key=bad)


async def test_a_retried_begin_of_the_same_request_is_not_a_duplicate(
    store: IdempotencyStore,
) -> None:
    assert isinstance(await begin(store), IdempotencyTicket)
    assert isinstance(await begin(store), IdempotencyTicket)  # same request id
