"""Injected faults: what each one looks like on the wire, counts, scopes, runtime control."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from app.sandbox import FaultRule, SandboxConfig, SandboxControl, embedded_sandbox

FLUX = "fal-ai/flux/dev"
BODY = {"prompt": "x", "image_size": "square"}


@pytest.mark.parametrize(
    ("rule", "status", "detail", "headers"),
    [
        ({"kind": "error", "status_code": 500}, 500, "Internal Server Error", {}),
        ({"kind": "error", "status_code": 502}, 502, "Bad Gateway", {}),
        (
            {"kind": "error", "status_code": 503},
            503,
            "Runner scheduling failure",
            {"x-fal-error-type": "runner_scheduling_failure"},
        ),
        (
            {"kind": "error", "status_code": 504},
            504,
            "Request timed out",
            {"x-fal-error-type": "request_timeout"},
        ),
        ({"kind": "rate_limit", "retry_after_s": 3}, 429, None, {"retry-after": "3"}),
        (
            {"kind": "timeout", "user_timeout": True},
            504,
            "Request timed out",
            {"x-fal-request-timeout-type": "user"},
        ),
        ({"kind": "bad_key"}, 401, "No user found for Key ID and Secret", {}),
        ({"kind": "locked"}, 403, None, {}),
    ],
)
async def test_error_faults_have_fal_bodies(
    fal: httpx.AsyncClient,
    control: SandboxControl,
    rule: dict[str, Any],
    status: int,
    detail: str | None,
    headers: dict[str, str],
) -> None:
    await control.configure(faults=[{**rule, "scope": "run"}])
    response = await fal.post(f"/{FLUX}", json=BODY)
    assert response.status_code == status
    body = response.json()
    if detail is not None:
        assert body["detail"] == detail
    for name, value in headers.items():
        assert response.headers[name] == value
    if status == 403:
        assert body["detail"].startswith("User is locked. Reason: Exhausted balance.")
    # Scoped to run: the queue is unaffected.
    assert (await fal.post(f"/queue/{FLUX}", json=BODY)).status_code == 200


async def test_422_fault_is_a_detail_list_and_detail_can_be_chosen(
    fal: httpx.AsyncClient, control: SandboxControl
) -> None:
    await control.add_fault(kind="error", scope="submit", status_code=422)
    detail = (await fal.post(f"/queue/{FLUX}", json=BODY)).json()["detail"]
    assert isinstance(detail, list) and {"loc", "msg", "type"} <= set(detail[0])

    custom = [{"loc": ["body", "prompt"], "msg": "unsafe", "type": "content_policy_violation"}]
    await control.configure(
        faults=[{"kind": "error", "scope": "submit", "status_code": 422, "detail": custom}]
    )
    assert (await fal.post(f"/queue/{FLUX}", json=BODY)).json()["detail"] == custom


async def test_count_limits_a_fault_to_the_next_n_calls(
    fal: httpx.AsyncClient, control: SandboxControl
) -> None:
    await control.add_fault(kind="error", scope="run", status_code=503, count=2)
    codes = [(await fal.post(f"/{FLUX}", json=BODY)).status_code for _ in range(3)]
    assert codes == [503, 503, 200]
    assert (await control.config())["faults"][0]["hits"] == 2


async def test_endpoint_filter(fal: httpx.AsyncClient, control: SandboxControl) -> None:
    await control.add_fault(kind="error", scope="run", status_code=500, endpoint=FLUX)
    assert (await fal.post(f"/{FLUX}", json=BODY)).status_code == 500
    assert (await fal.post("/fal-ai/flux/schnell", json=BODY)).status_code == 200


async def test_drop_closes_the_connection_without_a_response(
    fal: httpx.AsyncClient, control: SandboxControl
) -> None:
    await control.add_fault(kind="drop", scope="run", count=1)
    with pytest.raises(httpx.RemoteProtocolError, match="without sending"):
        await fal.post(f"/{FLUX}", json=BODY)
    assert (await fal.post(f"/{FLUX}", json=BODY)).status_code == 200
    assert len(await control.requests()) == 1


async def test_hang_never_answers(fal: httpx.AsyncClient, control: SandboxControl) -> None:
    await control.add_fault(kind="hang", scope="status")
    rid = (await fal.post(f"/queue/{FLUX}", json=BODY)).json()["request_id"]
    with pytest.raises(httpx.ReadTimeout):
        await fal.get(f"/queue/fal-ai/flux/requests/{rid}/status", timeout=0.3)


async def test_delay_slows_then_answers(fal: httpx.AsyncClient, control: SandboxControl) -> None:
    await control.add_fault(kind="delay", scope="run", delay_ms=400)
    with pytest.raises(httpx.ReadTimeout):
        await fal.post(f"/{FLUX}", json=BODY, timeout=0.2)
    started = asyncio.get_running_loop().time()
    assert (await fal.post(f"/{FLUX}", json=BODY)).status_code == 200
    assert asyncio.get_running_loop().time() - started >= 0.4


@pytest.mark.parametrize(
    ("rule", "status"),
    [
        ({"kind": "error", "status_code": 500}, 500),
        ({"kind": "error", "status_code": 422}, 422),
        ({"kind": "timeout"}, 504),
    ],
)
async def test_job_faults_complete_the_request_with_an_error(
    fal: httpx.AsyncClient, control: SandboxControl, rule: dict[str, Any], status: int
) -> None:
    await control.configure(faults=[{**rule, "scope": "job"}])
    submitted = await fal.post(f"/queue/{FLUX}", json=BODY)
    assert submitted.status_code == 200
    urls = submitted.json()
    async with asyncio.timeout(5):
        while True:
            state = (await fal.get(urls["status_url"])).json()
            if state["status"] == "COMPLETED":
                break
            await asyncio.sleep(0.01)
    assert state["error"]
    result = await fal.get(urls["response_url"])
    assert result.status_code == status
    assert result.headers["x-fal-request-id"] == urls["request_id"]
    [entry] = await control.requests()
    assert entry["status"] == "failed"
    assert entry["error"]["status_code"] == status
    assert entry["images"] == [] and entry["pixels"] == 0

    # The same fault on a sync run answers with the error directly.
    response = await fal.post(f"/{FLUX}", json=BODY)
    assert response.status_code == status


async def test_job_faults_reject_request_level_kinds(control: SandboxControl) -> None:
    with pytest.raises(httpx.HTTPStatusError) as caught:
        await control.configure(faults=[{"kind": "drop", "scope": "job"}])
    assert caught.value.response.status_code == 422


async def test_generate_scope_covers_run_and_submit_only(
    fal: httpx.AsyncClient, control: SandboxControl
) -> None:
    await control.add_fault(kind="error", scope="generate", status_code=502)
    assert (await fal.post(f"/{FLUX}", json=BODY)).status_code == 502
    assert (await fal.post(f"/queue/{FLUX}", json=BODY)).status_code == 502
    await control.clear_faults()
    submitted = (await fal.post(f"/queue/{FLUX}", json=BODY)).json()
    await control.add_fault(kind="error", scope="generate", status_code=502)
    assert (await fal.get(submitted["status_url"])).status_code in (200, 202)


async def test_locked_status_can_be_scoped(fal: httpx.AsyncClient, control: SandboxControl) -> None:
    submitted = (await fal.post(f"/queue/{FLUX}", json=BODY)).json()
    await control.add_fault(kind="locked", scope="status")
    assert (await fal.get(submitted["status_url"])).status_code == 403


async def test_reset_restores_the_initial_config_and_empties_the_ledger(
    fal: httpx.AsyncClient, control: SandboxControl
) -> None:
    initial = await control.config()
    await control.configure(latency_ms=1, faults=[{"kind": "bad_key"}])
    assert (await fal.post(f"/{FLUX}", json=BODY)).status_code == 401
    await control.clear_faults()
    assert (await fal.post(f"/{FLUX}", json=BODY)).status_code == 200
    assert await control.requests()
    assert (await control.reset()) == initial
    assert await control.requests() == []


async def test_bad_config_is_refused(control: SandboxControl) -> None:
    for changes in ({"latency_ms": -1}, {"no_such_knob": 1}, {"faults": [{"kind": "boom"}]}):
        with pytest.raises(httpx.HTTPStatusError) as caught:
            await control.configure(**changes)
        assert caught.value.response.status_code == 422


async def test_faults_and_latency_from_the_constructor() -> None:
    config = SandboxConfig(
        latency_ms=0, faults=[FaultRule(kind="error", scope="run", status_code=503, count=1)]
    )
    async with embedded_sandbox(config=config) as url, SandboxControl(url) as ctl:
        assert url.startswith("http://127.0.0.1:") and not url.endswith(":0")
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": "Key k"}) as fal:
            assert (await fal.post(f"/{FLUX}", json=BODY)).status_code == 503
            assert (await fal.post(f"/{FLUX}", json=BODY)).status_code == 200
            # A reset goes back to the constructor's config, fault counter included.
            await ctl.reset()
            assert (await fal.post(f"/{FLUX}", json=BODY)).status_code == 503
        assert (await ctl.config())["latency_ms"] == 0
