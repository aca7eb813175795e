"""The sandbox speaks fal's wire protocol (fal-protocol.md sections 1 and 4)."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import httpx
import pytest

from app.sandbox import SandboxControl

FLUX = "fal-ai/flux/dev"
BIG_SEED = 2**63 + 12345


async def _wait_status(fal: httpx.AsyncClient, status_url: str, want: str) -> httpx.Response:
    async with asyncio.timeout(5):
        while True:
            response = await fal.get(status_url)
            if response.json()["status"] == want:
                return response
            await asyncio.sleep(0.01)


async def test_submit_answers_in_queue_with_urls_that_drop_the_model_path(
    fal: httpx.AsyncClient, sandbox_url: str
) -> None:
    response = await fal.post(f"/queue/{FLUX}", json={"prompt": "a fox"})
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "IN_QUEUE"
    assert isinstance(body["queue_position"], int)
    rid = body["request_id"]
    base = f"{sandbox_url}/queue/fal-ai/flux/requests/{rid}"
    assert body["response_url"] == base
    assert body["status_url"] == base + "/status"
    assert body["cancel_url"] == base + "/cancel"


async def test_status_is_202_while_pending_and_200_when_completed(
    fal: httpx.AsyncClient, control: SandboxControl
) -> None:
    await control.configure(latency_ms=300)
    submitted = (await fal.post(f"/queue/{FLUX}", json={"prompt": "a fox"})).json()
    pending = await fal.get(submitted["status_url"])
    assert pending.status_code == 202
    assert pending.json()["status"] in ("IN_QUEUE", "IN_PROGRESS")
    assert "logs" in pending.json() and pending.json()["logs"] is None

    done = await _wait_status(fal, submitted["status_url"], "COMPLETED")
    assert done.status_code == 200
    assert done.json()["logs"] is None
    assert "inference_time" in done.json()["metrics"]

    result = await fal.get(submitted["response_url"])
    assert result.status_code == 200
    assert result.headers["x-fal-request-id"] == submitted["request_id"]
    assert result.json()["images"][0]["width"] == 1024


async def test_queue_position_while_fal_concurrency_is_full(
    fal: httpx.AsyncClient, control: SandboxControl
) -> None:
    await control.configure(max_concurrent=1, faults=[{"kind": "hang", "scope": "job", "count": 1}])
    first = (await fal.post(f"/queue/{FLUX}", json={"prompt": "one"})).json()
    await _wait_status(fal, first["status_url"], "IN_PROGRESS")
    second = (await fal.post(f"/queue/{FLUX}", json={"prompt": "two"})).json()
    third = (await fal.post(f"/queue/{FLUX}", json={"prompt": "three"})).json()
    assert third["queue_position"] == 1

    status = await fal.get(second["status_url"])
    assert status.status_code == 202
    assert status.json()["status"] == "IN_QUEUE"
    assert status.json()["queue_position"] == 0
    assert (await fal.get(third["status_url"])).json()["queue_position"] == 1

    # Cancelling the stuck one frees the slot: the queue moves on.
    assert (await fal.put(first["cancel_url"])).json()["status"] == "CANCELLATION_REQUESTED"
    await _wait_status(fal, third["status_url"], "COMPLETED")


@pytest.mark.parametrize("value", ["1", "true", "True"])
async def test_logs_on_request(fal: httpx.AsyncClient, value: str) -> None:
    submitted = (await fal.post(f"/queue/{FLUX}", json={"prompt": "x"})).json()
    await _wait_status(fal, submitted["status_url"], "COMPLETED")
    logs = (await fal.get(submitted["status_url"], params={"logs": value})).json()["logs"]
    assert logs and {"message", "level", "source", "timestamp"} <= set(logs[0])


@pytest.mark.parametrize("value", ["0", "false"])
async def test_logs_off(fal: httpx.AsyncClient, value: str) -> None:
    submitted = (await fal.post(f"/queue/{FLUX}", json={"prompt": "x"})).json()
    body = (await fal.get(submitted["status_url"], params={"logs": value})).json()
    assert body["logs"] is None


async def test_status_with_the_full_model_path_is_not_found(
    fal: httpx.AsyncClient, sandbox_url: str
) -> None:
    rid = (await fal.post(f"/queue/{FLUX}", json={"prompt": "x"})).json()["request_id"]
    wrong = await fal.get(f"/queue/{FLUX}/requests/{rid}/status")
    assert wrong.status_code == 404
    assert (await fal.get(f"/queue/fal-ai/flux/requests/{rid}/status")).status_code in (200, 202)


async def test_result_before_completion_is_an_error(
    fal: httpx.AsyncClient, control: SandboxControl
) -> None:
    await control.configure(latency_ms=500)
    submitted = (await fal.post(f"/queue/{FLUX}", json={"prompt": "x"})).json()
    early = await fal.get(submitted["response_url"])
    assert early.status_code == 400
    assert "detail" in early.json()


async def test_cancel_answers(fal: httpx.AsyncClient, control: SandboxControl) -> None:
    await control.configure(max_concurrent=1, faults=[{"kind": "hang", "scope": "job", "count": 1}])
    running = (await fal.post(f"/queue/{FLUX}", json={"prompt": "a"})).json()
    await _wait_status(fal, running["status_url"], "IN_PROGRESS")
    queued = (await fal.post(f"/queue/{FLUX}", json={"prompt": "b"})).json()

    response = await fal.put(queued["cancel_url"])
    assert (response.status_code, response.json()) == (200, {"status": "OK"})
    response = await fal.put(running["cancel_url"])
    assert (response.status_code, response.json()["status"]) == (202, "CANCELLATION_REQUESTED")
    await _wait_status(fal, running["status_url"], "COMPLETED")
    response = await fal.put(running["cancel_url"])
    assert (response.status_code, response.json()["status"]) == (400, "ALREADY_COMPLETED")
    response = await fal.put("/queue/fal-ai/flux/requests/no-such-id/cancel")
    assert (response.status_code, response.json()["status"]) == (404, "NOT_FOUND")

    # A cancelled request is COMPLETED with an error, and the ledger says cancelled.
    status = (await fal.get(running["status_url"])).json()
    assert status["status"] == "COMPLETED" and status["error"]
    ledger = {e["request_id"]: e["status"] for e in await control.requests()}
    assert ledger[running["request_id"]] == "cancelled"
    assert ledger[queued["request_id"]] == "cancelled"


async def test_sync_run_returns_output_and_request_id_header(
    fal: httpx.AsyncClient, control: SandboxControl
) -> None:
    response = await fal.post(f"/{FLUX}", json={"prompt": "x", "image_size": "square"})
    assert response.status_code == 200
    rid = response.headers["x-fal-request-id"]
    assert response.json()["images"][0] | {"url": ""} == {
        "url": "",
        "width": 512,
        "height": 512,
        "content_type": "image/jpeg",
    }
    entry = await control.request(rid)
    assert entry["protocol"] == "sync" and entry["status"] == "completed"


async def test_seed_beyond_int64_passes_through_losslessly(fal: httpx.AsyncClient) -> None:
    for path in (f"/{FLUX}", f"/queue/{FLUX}"):
        response = await fal.post(path, json={"prompt": "x", "seed": BIG_SEED})
        if path.startswith("/queue"):
            submitted = response.json()
            await _wait_status(fal, submitted["status_url"], "COMPLETED")
            response = await fal.get(submitted["response_url"])
        # The raw text, not a float round-trip, carries the exact digits.
        assert re.search(rf'"seed":\s*{BIG_SEED}\b', response.text)


async def test_random_seed_when_absent(fal: httpx.AsyncClient) -> None:
    seeds = {
        (await fal.post(f"/{FLUX}", json={"prompt": "x", "image_size": "square"})).json()["seed"]
        for _ in range(3)
    }
    assert len(seeds) == 3
    assert all(isinstance(s, int) and 0 <= s < 2**64 for s in seeds)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "prompt"),
        ({"prompt": "x", "num_images": 5}, "num_images"),
        ({"prompt": "x", "image_size": "huge"}, "image_size"),
        ({"prompt": "x", "num_inference_steps": 51}, "num_inference_steps"),
        ({"prompt": "x", "output_format": "gif"}, "output_format"),
        ({"prompt": "x", "seed": 2**64}, "seed"),
    ],
)
async def test_validation_errors_are_fal_422_detail_lists(
    fal: httpx.AsyncClient, body: dict[str, Any], field: str
) -> None:
    for path in (f"/{FLUX}", f"/queue/{FLUX}"):
        response = await fal.post(path, json=body)
        assert response.status_code == 422
        detail = response.json()["detail"]
        assert isinstance(detail, list)
        assert detail[0]["loc"][:2] == ["body", field]
        assert {"loc", "msg", "type"} <= set(detail[0])


async def test_schnell_limits_steps_and_flux_pro_ignores_them(fal: httpx.AsyncClient) -> None:
    response = await fal.post(
        "/fal-ai/flux/schnell", json={"prompt": "x", "num_inference_steps": 13}
    )
    assert response.status_code == 422
    response = await fal.post(
        "/fal-ai/flux-pro/v1.1",
        json={"prompt": "x", "num_inference_steps": 99, "image_size": "square"},
    )
    assert response.status_code == 200


async def test_invalid_json_is_422(fal: httpx.AsyncClient) -> None:
    response = await fal.post(
        f"/{FLUX}", content=b"{nope", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422
    assert isinstance(response.json()["detail"], list)


async def test_unknown_endpoint_is_404(fal: httpx.AsyncClient) -> None:
    for path in ("/fal-ai/no-such-model", "/queue/fal-ai/no-such-model"):
        response = await fal.post(path, json={"prompt": "x"})
        assert response.status_code == 404
        assert "no-such-model" in response.json()["detail"]


@pytest.mark.parametrize("header", [None, "", "Key", "Basic abc"])
async def test_a_key_is_required(sandbox_url: str, header: str | None) -> None:
    headers = {"Authorization": header} if header is not None else {}
    async with httpx.AsyncClient(base_url=sandbox_url, headers=headers) as client:
        response = await client.post(f"/{FLUX}", json={"prompt": "x"})
    assert response.status_code == 401
    assert "detail" in response.json()


async def test_sync_run_abandoned_by_its_caller_is_cancelled(
    fal: httpx.AsyncClient, control: SandboxControl
) -> None:
    await control.configure(latency_ms=5000)
    with pytest.raises(httpx.ReadTimeout):
        await fal.post(f"/{FLUX}", json={"prompt": "x"}, timeout=0.3)
    async with asyncio.timeout(5):
        while True:
            entries = await control.requests()
            if entries and entries[0]["status"] == "cancelled":
                break
            await asyncio.sleep(0.02)


async def test_start_timeout_header_ends_a_queued_request_with_a_user_timeout(
    fal: httpx.AsyncClient, control: SandboxControl
) -> None:
    await control.configure(max_concurrent=1, faults=[{"kind": "hang", "scope": "job", "count": 1}])
    blocker = (await fal.post(f"/queue/{FLUX}", json={"prompt": "a"})).json()
    await _wait_status(fal, blocker["status_url"], "IN_PROGRESS")
    waiting = (
        await fal.post(
            f"/queue/{FLUX}", json={"prompt": "b"}, headers={"X-Fal-Request-Timeout": "0.2"}
        )
    ).json()
    status = (await _wait_status(fal, waiting["status_url"], "COMPLETED")).json()
    assert status["error_type"] == "request_timeout"
    result = await fal.get(waiting["response_url"])
    assert result.status_code == 504
    assert result.headers["x-fal-request-timeout-type"] == "user"
    assert result.headers["x-fal-error-type"] == "request_timeout"
    await fal.put(blocker["cancel_url"])
