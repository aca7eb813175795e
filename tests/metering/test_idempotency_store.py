"""Idempotency-Key records against a real Redis: replay, conflict, concurrent duplicates."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from app.errors import IdempotencyConflict, InvalidRequest
from app.metering import Meter
from app.metering.idempotency import IdempotencyStore, IdempotencyTicket, StoredResponse
from app.metering.meter import RequestRecord
from app.metering.sweeper import Sweeper
from app.settings import Settings


@pytest.fixture
def store(r: Any, settings: Settings) -> IdempotencyStore:
    return IdempotencyStore(Meter(r, settings, "proc_a"), wait_timeout_s=10, poll_interval_s=0.01)


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
    store = IdempotencyStore(Meter(r, settings, "proc_a"), wait_timeout_s=0.1, poll_interval_s=0.01)
    await Sweeper(r, settings, "proc_a", None).heartbeat()  # type: ignore[arg-type]
    await begin(store)
    with pytest.raises(IdempotencyConflict) as info:
        await begin(store, request_id="req_2")
    assert "in progress" in info.value.message


async def test_a_dead_owner_is_taken_over(r: Any, settings: Settings) -> None:
    quick = settings.model_copy(update={"process_lease_s": 0.0})
    dead = IdempotencyStore(Meter(r, quick, "proc_dead"), wait_timeout_s=5, poll_interval_s=0.01)
    await begin(dead)  # proc_dead has no lease: it crashed mid-request
    retry = await begin(
        IdempotencyStore(Meter(r, quick, "proc_b"), wait_timeout_s=5), request_id="req_2"
    )
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


async def _admitted(meter: Meter, make_key: Any, price: Any, request_id: str) -> Any:
    await make_key("key_a", budget_micro=1_000_000)
    return await meter.admit(
        key_id="key_a", request_id=request_id, model="m", operation="generate",
        estimate=price(10_000), endpoint="m", prompt="a fox",
    )  # fmt: skip


async def test_a_completed_first_attempt_whose_response_was_lost_is_not_run_again(
    r: Any, settings: Settings, make_key: Any, price: Any
) -> None:
    """The first attempt was charged, but its response never reached the store (Redis blinked):
    a retry, on any process, gets that outcome back instead of a second job."""
    meter = Meter(r, settings, "proc_a")
    store = IdempotencyStore(meter, wait_timeout_s=5, poll_interval_s=0.01)
    assert isinstance(await begin(store), IdempotencyTicket)
    admission = await _admitted(meter, make_key, price, "req_1")
    await meter.settle(admission, price(7_000))
    await Sweeper(r, settings, "proc_a", None).heartbeat()  # type: ignore[arg-type]
    other = IdempotencyStore(Meter(r, settings, "proc_b"), wait_timeout_s=5)
    retry = await begin(other, request_id="req_2")
    assert isinstance(retry, RequestRecord)
    assert (retry.request_id, retry.status, retry.charged) == ("req_1", "completed", 7_000)


async def test_a_retry_waits_while_the_first_attempt_is_with_fal_even_if_its_owner_died(
    r: Any, settings: Settings, make_key: Any, price: Any
) -> None:
    meter = Meter(r, settings, "proc_dead")  # no lease: its process is gone
    store = IdempotencyStore(meter, wait_timeout_s=5, poll_interval_s=0.01)
    assert isinstance(await begin(store), IdempotencyTicket)
    admission = await _admitted(meter, make_key, price, "req_1")
    await meter.attach_upstream(admission, "fal-123")
    retry = asyncio.create_task(
        begin(
            IdempotencyStore(Meter(r, settings, "proc_b"), poll_interval_s=0.01), request_id="req_2"
        )
    )
    await asyncio.sleep(0.2)
    assert not retry.done()  # it neither runs again nor gives up while fal has the job
    await meter.settle(admission, price(9_000))  # the resolver settles it from fal's answer
    outcome = await asyncio.wait_for(retry, 5)
    assert isinstance(outcome, RequestRecord) and outcome.charged == 9_000


async def test_a_failed_first_attempt_left_in_progress_is_taken_over(
    r: Any, settings: Settings, make_key: Any, price: Any
) -> None:
    meter = Meter(r, settings, "proc_a")
    await Sweeper(r, settings, "proc_a", None).heartbeat()  # type: ignore[arg-type]
    store = IdempotencyStore(meter, wait_timeout_s=5, poll_interval_s=0.01)
    assert isinstance(await begin(store), IdempotencyTicket)
    admission = await _admitted(meter, make_key, price, "req_1")
    await meter.release(admission, "failed")  # ... and its abandon() never reached Redis
    retry = await begin(store, request_id="req_2")
    assert isinstance(retry, IdempotencyTicket) and retry.request_id == "req_2"
