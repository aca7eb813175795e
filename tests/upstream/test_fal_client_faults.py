"""Every upstream failure becomes the right gateway error; retries, cancels, secrecy."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import httpx
import pytest

from app.errors import FalgateError, InvalidRequest, Unavailable, UpstreamError, UpstreamTimeout
from app.sandbox import SandboxControl
from app.upstream import FalClient, UpstreamCall
from tests.upstream.conftest import FAL_SECRET, MakeClient

FLUX = "fal-ai/flux/dev"
CALL = UpstreamCall(FLUX, {"prompt": "x", "image_size": "square"})
RETRIES = 2  # fal_settings' upstream_max_retries
SECRET_PART = FAL_SECRET.split(":")[1]


async def _hits(control: SandboxControl) -> int:
    return int((await control.config())["faults"][0]["hits"])


async def _eventually_cancelled(control: SandboxControl) -> dict[str, Any]:
    async with asyncio.timeout(5):
        while True:
            entries = await control.requests()
            if entries and entries[-1]["status"] == "cancelled":
                return entries[-1]
            await asyncio.sleep(0.02)


# (fault, error type, calls the sandbox sees) for the first call each protocol makes.
ALWAYS = [
    ({"kind": "error", "status_code": 400}, InvalidRequest, 1),
    ({"kind": "error", "status_code": 422}, InvalidRequest, 1),
    ({"kind": "error", "status_code": 500}, UpstreamError, 1),
    ({"kind": "error", "status_code": 502}, UpstreamError, RETRIES + 1),
    ({"kind": "error", "status_code": 503}, UpstreamError, RETRIES + 1),
    ({"kind": "error", "status_code": 504}, UpstreamTimeout, RETRIES + 1),
    ({"kind": "rate_limit"}, UpstreamError, RETRIES + 1),
    ({"kind": "timeout", "user_timeout": True}, UpstreamTimeout, 1),
    ({"kind": "drop"}, UpstreamError, 1),
    ({"kind": "bad_key"}, Unavailable, 1),
    ({"kind": "locked"}, Unavailable, 1),
]


@pytest.mark.parametrize(("fault", "error", "calls"), ALWAYS)
@pytest.mark.parametrize("mode", ["queue", "sync"])
async def test_fault_on_the_first_call(
    make_client: MakeClient,
    control: SandboxControl,
    mode: str,
    fault: dict[str, Any],
    error: type[FalgateError],
    calls: int,
) -> None:
    fal = await make_client(upstream_mode=mode)
    await control.configure(faults=[{**fault, "scope": "submit" if mode == "queue" else "run"}])
    with pytest.raises(error) as caught:
        await fal.run(CALL)
    assert type(caught.value) is error
    if fault["kind"] == "drop":
        assert isinstance(caught.value.__cause__, httpx.TransportError)
    assert await _hits(control) == calls
    # Nothing was accepted, so nothing ran.
    assert await control.requests() == []


@pytest.mark.parametrize("kind", ["bad_key", "locked"])
@pytest.mark.parametrize("mode", ["queue", "sync"])
async def test_auth_failures_are_generic_and_never_leak(
    make_client: MakeClient,
    control: SandboxControl,
    caplog: pytest.LogCaptureFixture,
    mode: str,
    kind: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    fal = await make_client(upstream_mode=mode)
    await control.configure(faults=[{"kind": kind}])
    with pytest.raises(Unavailable) as caught:
        await fal.run(CALL)
    text = f"{caught.value.message} {caught.value!r} {caught.value.headers} {caught.value.extra}"
    for needle in (SECRET_PART, "No user found", "Exhausted balance", "locked"):
        assert needle not in text
    logged = " ".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert caplog.records  # the failure is logged (without the secret)
    for needle in (SECRET_PART, "No user found", "Exhausted balance"):
        assert needle not in logged


async def test_secret_never_logged_on_any_path(
    make_client: MakeClient, control: SandboxControl, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fal = await make_client()
    await fal.run(CALL)
    for fault in ({"kind": "error", "status_code": 503}, {"kind": "drop"}, {"kind": "rate_limit"}):
        await control.configure(faults=[fault])
        with pytest.raises(FalgateError) as caught:
            await fal.run(CALL)
        assert SECRET_PART not in str(caught.value)
    assert caplog.records
    assert all(SECRET_PART not in f"{r.getMessage()} {r.__dict__}" for r in caplog.records)


@pytest.mark.parametrize("mode", ["queue", "sync"])
@pytest.mark.parametrize(
    "fault",
    [
        {"kind": "error", "status_code": 503},
        {"kind": "error", "status_code": 502},
        {"kind": "error", "status_code": 504},
        {"kind": "rate_limit", "retry_after_s": 0},
    ],
)
async def test_transient_faults_are_retried(
    make_client: MakeClient, control: SandboxControl, mode: str, fault: dict[str, Any]
) -> None:
    fal = await make_client(upstream_mode=mode)
    scope = "submit" if mode == "queue" else "run"
    await control.configure(faults=[{**fault, "scope": scope, "count": RETRIES}])
    result = await fal.run(CALL)
    assert result.images
    assert await _hits(control) == RETRIES
    assert [e["status"] for e in await control.requests()] == ["completed"]


@pytest.mark.parametrize("scope", ["status", "result"])
async def test_queue_reads_are_retried_after_a_dropped_connection(
    fal: FalClient, control: SandboxControl, scope: str
) -> None:
    # Safe to repeat, unlike a submit: a GET cannot start a second generation.
    await control.configure(faults=[{"kind": "drop", "scope": scope, "count": 1}])
    assert (await fal.run(CALL)).images
    assert await _hits(control) == 1


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        ({"kind": "error", "status_code": 500, "scope": "status"}, UpstreamError),
        ({"kind": "error", "status_code": 500, "scope": "result"}, UpstreamError),
        ({"kind": "error", "status_code": 503, "scope": "status"}, UpstreamError),
        ({"kind": "locked", "scope": "status"}, Unavailable),
        ({"kind": "error", "status_code": 422, "scope": "job"}, InvalidRequest),
        ({"kind": "error", "status_code": 500, "scope": "job"}, UpstreamError),
        ({"kind": "timeout", "scope": "job"}, UpstreamTimeout),
    ],
)
async def test_faults_after_the_submit(
    fal: FalClient, control: SandboxControl, fault: dict[str, Any], error: type[FalgateError]
) -> None:
    await control.configure(faults=[fault])
    with pytest.raises(error):
        await fal.run(CALL)


async def test_status_read_timeout(make_client: MakeClient, control: SandboxControl) -> None:
    fal = await make_client(upstream_read_timeout_s=0.2)
    await control.configure(faults=[{"kind": "hang", "scope": "status"}])
    with pytest.raises(UpstreamTimeout):
        await fal.run(CALL)


async def test_hanging_submit_times_out(fal: FalClient, control: SandboxControl) -> None:
    await control.configure(faults=[{"kind": "hang", "scope": "submit"}])
    with pytest.raises(UpstreamTimeout):
        await fal.run(CALL, timeout_s=0.3)


async def test_deadline_cancels_the_request_at_fal(fal: FalClient, control: SandboxControl) -> None:
    await control.configure(faults=[{"kind": "hang", "scope": "job"}])
    with pytest.raises(UpstreamTimeout):
        await fal.run(CALL, timeout_s=0.3)
    entry = await _eventually_cancelled(control)
    assert entry["images"] == []


async def test_caller_going_away_cancels_the_request_at_fal(
    fal: FalClient, control: SandboxControl
) -> None:
    await control.configure(faults=[{"kind": "hang", "scope": "job"}])
    submitted = asyncio.Event()

    async def on_submitted(_: str) -> None:
        submitted.set()

    task = asyncio.create_task(fal.run(CALL, on_submitted=on_submitted))
    await asyncio.wait_for(submitted.wait(), 5)
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The cancel was sent before CancelledError surfaced.
    [entry] = await control.requests()
    assert entry["status"] == "cancelled"


async def test_sync_caller_going_away_drops_the_connection(
    make_client: MakeClient, control: SandboxControl
) -> None:
    fal = await make_client(upstream_mode="sync")
    await control.configure(latency_ms=5000)
    task = asyncio.create_task(fal.run(CALL))
    async with asyncio.timeout(5):
        while True:
            if await control.requests():
                break
            await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _eventually_cancelled(control)


async def test_on_submitted_failing_cancels_the_request(
    fal: FalClient, control: SandboxControl
) -> None:
    await control.configure(latency_ms=5000)

    async def broken(_: str) -> None:
        raise RuntimeError("ledger unavailable")

    with pytest.raises(RuntimeError, match="ledger unavailable"):
        await fal.run(CALL, on_submitted=broken)
    [entry] = await control.requests()
    assert entry["status"] == "cancelled"


@pytest.mark.parametrize("mode", ["queue", "sync"])
async def test_unreachable_fal(make_client: MakeClient, mode: str) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    fal = await make_client(base_url=closed, upstream_mode=mode)
    with pytest.raises(UpstreamError, match="unreachable") as caught:
        await fal.run(CALL)
    assert caught.value.__cause__ is not None
    with pytest.raises(UpstreamError):
        await fal.outcome(FLUX, "some-id")
