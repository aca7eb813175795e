"""fal's queue API answers a submit at once (SPEC section 11): billing must not depend on the
client coming back. The job's hold is handed to the resolver, which settles it when fal
finishes, or releases it when fal cancels it without output. Real Redis, the real sandbox in
process, the real fal client; nothing follows the job but the resolver."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from app.catalog import price_images
from app.generation import service
from app.keys.schemas import KeyCreate
from app.keys.service import ApiKey, KeyService
from app.metering import Meter
from app.metering.deferred import DeferredWrites
from app.metering.leases import LeaseKeeper
from app.metering.sweeper import Sweeper
from app.ops.shutdown import InflightTracker
from app.ratelimit.upstream_gate import UpstreamGate
from app.sandbox import embedded_sandbox
from app.settings import Settings
from app.upstream.client import FalClient
from app.upstream.types import UpstreamCall
from tests.money import cost_of


@pytest.fixture
async def money(r: Any, settings: Settings) -> AsyncIterator[tuple[service.MoneyPath, str]]:
    async with embedded_sandbox("127.0.0.1", 0, latency_ms=300) as base:
        upstream = settings.model_copy(
            update={"fal_run_url": base, "fal_queue_url": base + "/queue", "fal_key": None}
        )
        fal = FalClient(upstream)
        await fal.start()
        meter = Meter(r, settings, "proc_submit")
        gate = UpstreamGate(r, settings, "proc_submit")
        resolver = Sweeper(r, settings, "proc_submit", fal)
        path = service.MoneyPath(
            meter,
            gate,
            fal,
            InflightTracker(),
            LeaseKeeper(meter, gate),
            DeferredWrites(r),
            resolver,
        )
        try:
            yield path, base
        finally:
            await fal.aclose()


def _job(width: int, height: int) -> service.Job:
    return service.Job(
        operation=service.GENERATE,
        model_id="fal-ai/flux/dev",
        call=UpstreamCall(
            "fal-ai/flux/dev",
            {"prompt": "x", "image_size": {"width": width, "height": height}},
        ),
        estimate=price_images([(width, height)], 15_000),
        image_size=(width, height),
        output_format="jpeg",
        prompt="x",
    )


async def _key(r: Any) -> ApiKey:
    key, _ = await KeyService(r).create(KeyCreate(name="queue", budget_usd="1"))
    return key


async def _resolved(path: service.MoneyPath, key: ApiKey, request_id: str) -> Any:
    for _ in range(200):
        await path.resolver.sweep_once()
        record = await path.meter.request_record(key.id, request_id)
        if record is not None and record.resolved:
            return record
        await asyncio.sleep(0.05)
    raise AssertionError("never resolved")


async def test_a_submitted_job_nobody_fetches_is_settled_when_fal_finishes(
    r: Any, money: tuple[service.MoneyPath, str]
) -> None:
    path, base = money
    key = await _key(r)
    submitted = await service.submit(_job(640, 480), key, "req_" + "a" * 32, path)
    usage = await path.meter.usage(key.id)
    assert (usage["held_usd"], usage["in_flight"]) == ("0.004608", 1)  # the job is in flight

    record = await _resolved(path, key, submitted.request_id)
    async with httpx.AsyncClient() as http:
        produced = (await http.get(f"{base}/_sandbox/requests")).json()["requests"]
    (job,) = produced
    assert job["request_id"] == submitted.upstream_request_id == record.upstream_request_id
    assert record.status == "completed"
    assert record.charged == cost_of(job["pixels"]) == cost_of(640 * 480)
    assert [(i.width, i.height) for i in record.images] == [(640, 480)]
    usage = await path.meter.usage(key.id)
    assert (usage["held_usd"], usage["in_flight"], usage["spent_usd"]) == (
        "0.000000",
        0,
        "0.004608",
    )


async def test_a_submitted_job_cancelled_at_fal_is_released(
    r: Any, money: tuple[service.MoneyPath, str]
) -> None:
    path, _ = money
    key = await _key(r)
    submitted = await service.submit(_job(512, 512), key, "req_" + "b" * 32, path)
    answer = await path.fal.cancel("fal-ai/flux/dev", submitted.upstream_request_id)
    assert answer in ("OK", "CANCELLATION_REQUESTED")
    record = await _resolved(path, key, submitted.request_id)
    assert (record.status, record.charged) == ("cancelled", 0)
    usage = await path.meter.usage(key.id)
    assert (usage["held_usd"], usage["in_flight"], usage["spent_usd"]) == (
        "0.000000",
        0,
        "0.000000",
    )
