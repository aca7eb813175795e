"""The sandbox's bookkeeping stays right with many remembered jobs (issue 15: O(1) per request).

These drive ``SandboxState`` directly, the part the HTTP routes call on every request, and
compare its answers with the obvious full-scan definition after every step.
"""

from __future__ import annotations

import random

from app.sandbox.config import SandboxConfig
from app.sandbox.state import FalResponse, Job, SandboxState

FLUX = "fal-ai/flux/dev"
_DONE = FalResponse(200, {})


def _state(max_requests: int) -> SandboxState:
    return SandboxState(SandboxConfig(max_requests=max_requests))


def _new(state: SandboxState) -> Job:
    return state.new_job(
        endpoint=FLUX, protocol="queue", arguments={}, base_url="http://s", start_timeout_s=None
    )


def _scan_position(state: SandboxState, job: Job) -> int:
    """The definition: waiting jobs created before ``job``."""
    waiting = [j for j in state.jobs.values() if j.state == "IN_QUEUE" and j.outcome is None]
    return waiting.index(job) if job in waiting else 0


def test_positions_match_a_full_scan_under_random_churn() -> None:
    rng = random.Random(15)
    state = _state(max_requests=1_000_000)
    live: list[Job] = []
    for step in range(6_000):
        roll = rng.random()
        waiting = [j for j in live if j.state == "IN_QUEUE"]
        if roll < 0.5 or not waiting:
            live.append(_new(state))
        elif roll < 0.8:
            state.start(waiting[0])  # the usual case: the head of the queue gets a slot
        elif roll < 0.9:
            state.start(rng.choice(waiting))  # a slot race won out of turn
        else:
            state.finish(rng.choice(waiting), "cancelled", _DONE)  # cancelled while queued
        running = [j for j in live if j.state == "IN_PROGRESS"]
        if running and rng.random() < 0.5:
            state.finish(rng.choice(running), "completed", _DONE)
        live = [j for j in live if j.outcome is None]
        if step % 199 == 0:
            for job in list(state.jobs.values())[-100:]:
                assert state.queue_position(job) == _scan_position(state, job)
    for job in state.jobs.values():
        assert state.queue_position(job) == _scan_position(state, job)


def test_fifo_queue_of_many_jobs_counts_down() -> None:
    state = _state(max_requests=100_000)
    jobs = [_new(state) for _ in range(50_000)]
    assert [state.queue_position(j) for j in jobs[:3]] == [0, 1, 2]
    assert state.queue_position(jobs[-1]) == 49_999
    for job in jobs[:30_000]:
        state.start(job)
    assert state.queue_position(jobs[30_000]) == 0
    assert state.queue_position(jobs[-1]) == 19_999
    assert state.queue_position(jobs[0]) == 0  # running: not in the queue
    # Out-of-turn departures behind the head shift everyone after them only.
    state.finish(jobs[40_000], "cancelled", _DONE)
    state.start(jobs[45_000])
    assert state.queue_position(jobs[39_999]) == 9_999
    assert state.queue_position(jobs[44_000]) == 13_999
    assert state.queue_position(jobs[-1]) == 19_997
    # The head catching up with the holes leaves the arithmetic right.
    for job in jobs[30_000:40_000]:
        state.start(job)
    assert state.queue_position(jobs[40_001]) == 0
    assert state.queue_position(jobs[-1]) == 9_997


def test_expiry_keeps_the_newest_finished_and_every_unfinished_job() -> None:
    limit = 1_000
    state = _state(max_requests=limit)
    unfinished = [_new(state) for _ in range(10)]
    finished_order: list[str] = []
    for _ in range(60_000):
        job = _new(state)
        state.start(job)
        state.finish(job, "completed", _DONE)
        finished_order.append(job.request_id)
        assert len(state.jobs) <= limit + 1  # at most the one just added before it is trimmed
    assert len(state.jobs) == limit
    assert all(j.request_id in state.jobs for j in unfinished)
    assert list(state.jobs)[10:] == finished_order[-(limit - 10) :]
    # Unfinished jobs are never forgotten, even when they alone exceed the limit.
    more = [_new(state) for _ in range(limit + 5)]
    assert len(state.jobs) == len(more) + len(unfinished)  # every finished one is gone
    assert all(j.request_id in state.jobs for j in more + unfinished)
    assert state.queue_position(more[-1]) == 10 + limit + 4


def test_reset_forgets_the_queue_too() -> None:
    state = _state(max_requests=10)
    for _ in range(25):
        _new(state)
    state.clear()
    job = _new(state)
    assert state.queue_position(job) == 0
    for _ in range(30):
        done = _new(state)
        state.finish(done, "completed", _DONE)
    assert job.request_id in state.jobs
    assert len(state.jobs) == 10
