"""``resolve_one(follow=True)``: whoever watches a job handed to the resolver (fal's queue
API) gets it settled as soon as fal finishes, not a whole resolver claim later."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from app.generation import service
from tests.metering.test_detached_submit import _job, _key, money  # noqa: F401 (fixture)


async def test_a_followed_job_is_settled_inside_another_resolvers_claim(
    r: Any,
    money: tuple[service.MoneyPath, str],  # noqa: F811
) -> None:
    path, base = money
    key = await _key(r)
    submitted = await service.submit(_job(512, 512), key, "req_" + "f" * 32, path)
    # A sweep finds it pending at fal and claims it for a whole claim (2 sweep intervals).
    report = await path.resolver.sweep_once()
    assert submitted.request_id in report.pending
    async with httpx.AsyncClient() as http:
        for _ in range(200):
            (job,) = (await http.get(f"{base}/_sandbox/requests")).json()["requests"]
            if job["status"] == "completed":
                break
            await asyncio.sleep(0.05)
    assert job["status"] == "completed"

    unforced = await path.resolver.resolve_one(key.id, submitted.request_id)
    assert unforced.settled == []  # still inside the sweep's claim
    followed = await path.resolver.resolve_one(key.id, submitted.request_id, follow=True)
    assert followed.settled == [submitted.request_id]
    record = await path.meter.request_record(key.id, submitted.request_id)
    assert record is not None and record.status == "completed"
    assert record.charged == -(-job["pixels"] * 15_000 // 1_000_000)
