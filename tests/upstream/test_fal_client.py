"""FalClient against the sandbox: both protocols, results, outcomes, cancel."""

from __future__ import annotations

import asyncio
import base64
import io

import pytest
from PIL import Image

from app.errors import InvalidRequest, UpstreamError
from app.sandbox import SandboxControl
from app.upstream import (
    FalClient,
    OutcomeState,
    UpstreamCall,
    app_path,
    parse_result,
    render_detail,
)
from tests.upstream.conftest import MakeClient

FLUX = "fal-ai/flux/dev"
BIG_SEED = 2**64 - 1


def _png(width: int, height: int) -> str:
    out = io.BytesIO()
    Image.new("RGB", (width, height)).save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


async def test_queue_run_reports_the_request_id_before_the_work_is_done(
    fal: FalClient, control: SandboxControl
) -> None:
    await control.configure(latency_ms=300)
    seen: list[tuple[str, str]] = []

    async def on_submitted(request_id: str) -> None:
        seen.append((request_id, (await control.request(request_id))["status"]))

    result = await fal.run(
        UpstreamCall(FLUX, {"prompt": "a fox", "seed": BIG_SEED}), on_submitted=on_submitted
    )
    assert seen == [(result.request_id, seen[0][1])]
    assert seen[0][1] in ("in_queue", "in_progress")
    assert result.seed == BIG_SEED
    [image] = result.images
    assert (image.width, image.height, image.content_type) == (1024, 768, "image/jpeg")
    [entry] = await control.requests()
    assert entry["request_id"] == result.request_id and entry["protocol"] == "queue"
    assert entry["status"] == "completed" and entry["pixels"] == 1024 * 768


async def test_sync_run(make_client: MakeClient, control: SandboxControl) -> None:
    fal = await make_client(upstream_mode="sync")
    called: list[str] = []

    async def on_submitted(request_id: str) -> None:
        called.append(request_id)

    result = await fal.run(
        UpstreamCall(FLUX, {"prompt": "x", "num_images": 2, "image_size": "square"}),
        on_submitted=on_submitted,
    )
    assert called == []
    assert [(i.width, i.height) for i in result.images] == [(512, 512)] * 2
    [entry] = await control.requests()
    assert entry["request_id"] == result.request_id and entry["protocol"] == "sync"


@pytest.mark.parametrize("mode", ["queue", "sync"])
async def test_upscaler_without_dimensions(make_client: MakeClient, mode: str) -> None:
    fal = await make_client(upstream_mode=mode)
    call = UpstreamCall("fal-ai/topaz/upscale/image", {"image_url": _png(30, 20)})
    [image] = (await fal.run(call)).images
    assert image.width is None and image.height is None
    assert image.content_type == "image/jpeg"
    assert image.url.endswith(".jpg")


@pytest.mark.parametrize("mode", ["queue", "sync"])
async def test_fal_validation_errors_become_invalid_request(
    make_client: MakeClient, mode: str
) -> None:
    fal = await make_client(upstream_mode=mode)
    with pytest.raises(InvalidRequest) as caught:
        await fal.run(UpstreamCall(FLUX, {"prompt": "x", "num_images": 9}))
    assert "num_images: Input should be less than or equal to 4" in caught.value.message
    with pytest.raises(InvalidRequest, match="no-such-model"):
        await fal.run(UpstreamCall("fal-ai/no-such-model", {"prompt": "x"}))


async def test_model_errors_reported_at_result_time(fal: FalClient) -> None:
    """An input image fal cannot load fails the job, not the submit: still a 400."""
    call = UpstreamCall("fal-ai/esrgan", {"image_url": "data:text/plain;base64,aGk="})
    with pytest.raises(InvalidRequest, match="image_url"):
        await fal.run(call)


async def test_outcome_of_each_kind_of_request(fal: FalClient, control: SandboxControl) -> None:
    done = await fal.run(UpstreamCall(FLUX, {"prompt": "x"}))
    assert done.request_id is not None
    outcome = await fal.outcome(FLUX, done.request_id)
    assert outcome.state is OutcomeState.COMPLETED
    assert outcome.result is not None and outcome.result.images == done.images

    assert (await fal.outcome(FLUX, "no-such-request")).state is OutcomeState.UNKNOWN

    await control.configure(faults=[{"kind": "hang", "scope": "job", "count": 1}])
    ids: list[str] = []
    submitted = asyncio.Event()

    async def remember(request_id: str) -> None:
        ids.append(request_id)
        submitted.set()

    task = asyncio.create_task(fal.run(UpstreamCall(FLUX, {"prompt": "x"}), on_submitted=remember))
    await asyncio.wait_for(submitted.wait(), 5)
    assert (await fal.outcome(FLUX, ids[0])).state is OutcomeState.PENDING
    assert await fal.cancel(FLUX, ids[0]) in ("OK", "CANCELLATION_REQUESTED")
    with pytest.raises(InvalidRequest):
        await task  # someone cancelled it under us: the result is fal's error
    assert (await fal.outcome(FLUX, ids[0])).state is OutcomeState.CANCELLED

    await control.configure(faults=[{"kind": "error", "scope": "job", "status_code": 500}])
    with pytest.raises(UpstreamError):
        await fal.run(UpstreamCall(FLUX, {"prompt": "x"}))
    [failed] = await control.requests(status="failed")
    assert (await fal.outcome(FLUX, failed["request_id"])).state is OutcomeState.FAILED


async def test_cancel_answers(fal: FalClient, control: SandboxControl) -> None:
    done = await fal.run(UpstreamCall(FLUX, {"prompt": "x"}))
    assert done.request_id is not None
    assert await fal.cancel(FLUX, done.request_id) == "ALREADY_COMPLETED"
    assert await fal.cancel(FLUX, "no-such-request") == "NOT_FOUND"


def test_app_path_drops_the_endpoint_path() -> None:
    assert app_path("fal-ai/flux/dev/image-to-image") == "fal-ai/flux"
    assert app_path("fal-ai/esrgan") == "fal-ai/esrgan"
    assert app_path("workflows/owner/app/x") == "workflows/owner/app"
    with pytest.raises(InvalidRequest):
        app_path("flux")


def test_render_detail() -> None:
    detail = [
        {"loc": ["body", "image_size", "width"], "msg": "too big", "type": "x"},
        {"loc": ["body"], "msg": "bad", "type": "y"},
    ]
    assert render_detail(detail) == "image_size.width: too big; bad"
    assert render_detail("plain") == "plain"
    assert render_detail(None) == ""


def test_parse_result_shapes() -> None:
    single = parse_result({"image": {"url": "u", "file_size": 3}}, "r")
    assert single.images[0].url == "u" and single.images[0].width is None
    assert parse_result({"images": [{"url": "u"}], "seed": "123"}, None).seed == 123
    assert parse_result({"images": [{"url": "u"}], "seed": True}, None).seed is None
    for bad in ({"images": []}, {"images": [{"width": 3}]}, ["x"], {"detail": "x"}):
        with pytest.raises(UpstreamError):
            parse_result(bad, None)
