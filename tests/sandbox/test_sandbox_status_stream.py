"""fal's status stream (fal-protocol.md 1.3): one SSE event per status change, the current
status first, the stream closed after COMPLETED; read with a real SSE client (httpx-sse)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from httpx_sse import aconnect_sse

from app.sandbox import SandboxControl

FLUX = "fal-ai/flux/dev"


async def _events(fal: httpx.AsyncClient, url: str, **params: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    async with asyncio.timeout(10), aconnect_sse(fal, "GET", url, params=params) as source:
        assert source.response.status_code == 200
        assert source.response.headers["content-type"].startswith("text/event-stream")
        async for event in source.aiter_sse():
            events.append(event.json())
    return events  # the server ended the stream


async def test_stream_follows_a_job_to_completed_and_ends(fal: httpx.AsyncClient) -> None:
    submitted = (await fal.post(f"/queue/{FLUX}", json={"prompt": "a fox"})).json()
    events = await _events(fal, submitted["status_url"] + "/stream")
    statuses = [e["status"] for e in events]
    assert statuses[-1] == "COMPLETED" and statuses.count("COMPLETED") == 1
    assert statuses == sorted(statuses, key=["IN_QUEUE", "IN_PROGRESS", "COMPLETED"].index)
    done = events[-1]
    assert done["request_id"] == submitted["request_id"]
    assert done["response_url"] == submitted["response_url"]
    assert "inference_time" in done["metrics"] and done["logs"] is None
    result = await fal.get(done["response_url"])
    assert result.status_code == 200 and result.json()["images"]


async def test_stream_reports_the_queue_then_the_run(
    fal: httpx.AsyncClient, control: SandboxControl
) -> None:
    await control.configure(max_concurrent=1, faults=[{"kind": "hang", "scope": "job", "count": 1}])
    first = (await fal.post(f"/queue/{FLUX}", json={"prompt": "stuck"})).json()
    second = (await fal.post(f"/queue/{FLUX}", json={"prompt": "waits"})).json()
    watching = asyncio.create_task(_events(fal, second["status_url"] + "/stream", logs="1"))
    await asyncio.sleep(0.2)
    assert not watching.done()  # still IN_QUEUE behind the stuck job: the stream stays open
    await fal.put(first["cancel_url"])
    events = await watching
    assert [e["status"] for e in events] == ["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
    assert events[0]["queue_position"] == 0
    assert events[-1]["logs"]  # logs=1


async def test_stream_of_a_finished_job_is_one_event(fal: httpx.AsyncClient) -> None:
    ran = await fal.post(f"/queue/{FLUX}", json={"prompt": "x"})
    url = ran.json()["status_url"]
    await _events(fal, url + "/stream")  # until it is done
    assert [e["status"] for e in await _events(fal, url + "/stream")] == ["COMPLETED"]
    [done] = await _events(fal, url + "/stream", logs="1")
    assert done["status"] == "COMPLETED" and done["logs"] and done["metrics"]
    again = await fal.get(url + "/stream")
    assert again.headers["x-fal-request-id"] == ran.json()["request_id"]
    assert again.headers["cache-control"] == "no-cache"
    assert again.text == f"data: {again.text.removeprefix('data: ').strip()}\n\n"


async def test_stream_of_an_unknown_request_is_404(fal: httpx.AsyncClient) -> None:
    response = await fal.get("/queue/fal-ai/flux/requests/nope/status/stream")
    assert response.status_code == 404
    assert (await fal.get("/queue/fal-ai/flux/requests/nope/status/stream")).json()["detail"]
