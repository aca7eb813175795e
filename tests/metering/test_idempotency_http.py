"""The ``Idempotency-Key`` wrapper on a real ASGI app: the handler runs once per key."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from app.errors import UpstreamError, add_exception_handlers
from app.metering import Meter
from app.metering.http import idempotent
from app.metering.meter import RequestRecord
from app.settings import Settings


def make_app(r: Any, settings: Settings) -> tuple[FastAPI, list[int]]:
    app = FastAPI()
    add_exception_handlers(app)
    app.state.settings = settings
    app.state.meter = Meter(r, settings, "proc_http")
    runs: list[int] = []

    @app.post("/work")
    async def work(request: Request) -> Response:
        async def handler() -> Response:
            runs.append(1)
            await asyncio.sleep(0.05)
            body = await request.json()
            if body.get("fail"):
                raise UpstreamError("fal failed")
            return JSONResponse({"run": len(runs)}, headers={"X-Cost-USD": "0.000001"})

        def replay(record: RequestRecord) -> Response:
            return JSONResponse({"replayed": record.request_id})

        return await idempotent(request, "key_a", handler, replay)

    return app, runs


async def test_first_runs_replays_repeat_conflicts_409_failures_free(
    r: Any, settings: Settings
) -> None:
    app, runs = make_app(r, settings)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        k1 = {"Idempotency-Key": "k1"}
        together = await asyncio.gather(
            *(client.post("/work", json={"a": 1}, headers=k1) for _ in range(5))
        )
        assert {r.json()["run"] for r in together} == {1}
        assert [r.headers.get("Idempotent-Replayed") for r in together].count(None) == 1
        assert all(r.headers["X-Cost-USD"] == "0.000001" for r in together)
        conflict = await client.post("/work", json={"a": 2}, headers=k1)
        assert conflict.status_code == 409

        k2 = {"Idempotency-Key": "k2"}
        assert (await client.post("/work", json={"fail": 1}, headers=k2)).status_code == 502
        assert (await client.post("/work", json={"fail": 1}, headers=k2)).status_code == 502
        plain = await client.post("/work", json={"a": 1})
        assert plain.status_code == 200
    assert len(runs) == 4  # once for k1, twice for the failing k2, once without a key
