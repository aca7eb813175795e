"""The metered request path: plan (validate, price), admit (hold), forward, settle.

A request becomes a :class:`Job` first: the exact upstream call and the exact estimate. The
price routes stop there. The run routes admit the job against the key's budget and limits
(one atomic step that places a hold), forward it to fal under the global concurrency cap, and
settle the hold to the real cost of what fal returned, or release it on any failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from app.catalog import Catalog, Price, price_images
from app.catalog.adapters import image_to_image_call, text_to_image_call, upscale_call
from app.errors import InvalidRequest, PayloadTooLarge, Unavailable, UpstreamError
from app.generation.schemas import (
    GenerateRequest,
    TransformRequest,
    UpscaleRequest,
    image_dimensions,
)
from app.images import fit_to_size, load_input_image, to_data_uri
from app.keys.service import ApiKey
from app.metering.lua import run_together
from app.metering.meter import AdmitRequest
from app.ops.metrics import record_settled
from app.ops.shutdown import InflightTracker
from app.settings import Settings
from app.upstream.types import GeneratedImage, UpstreamCall, UpstreamResult

GENERATE, TRANSFORM, UPSCALE = "generate", "transform", "upscale"
SETTLE_RETRY_S = 10.0

log = logging.getLogger("falgate.generation")


@dataclass
class Job:
    """One priced, ready-to-forward request."""

    operation: str
    model_id: str  # catalog id (or upscaler id) as it appears in the ledger
    call: UpstreamCall
    estimate: Price
    image_size: tuple[int, int]  # each output image's size
    output_format: str
    prompt: str | None = None
    seed: int | None = None


@dataclass
class Outcome:
    job: Job
    images: list[GeneratedImage]
    seed: int | None
    charged: int
    remaining: int | None
    headers: dict[str, str] = field(default_factory=dict)
    upstream_request_id: str | None = None


def _check_output_pixels(width: int, height: int, settings: Settings) -> None:
    if width * height > settings.max_output_pixels:
        raise InvalidRequest(
            f"image_size {width}x{height} is over {settings.max_output_megapixels} megapixels.",
            param="image_size",
        )


def _steps(requested: int | None, max_steps: int, default: int, model_id: str) -> int:
    if requested is None:
        return default
    if requested > max_steps:
        raise InvalidRequest(
            f"num_inference_steps must be at most {max_steps} for model '{model_id}'.",
            param="num_inference_steps",
        )
    return requested


def plan_generate(
    catalog: Catalog, settings: Settings, key: ApiKey, model_name: str, body: GenerateRequest
) -> Job:
    model = catalog.model(model_name)
    if body.model is not None and catalog.model(body.model).id != model.id:
        raise InvalidRequest(
            f"Body field 'model' names '{body.model}' but the route names '{model_name}'.",
            param="model",
        )
    key.check_model(model.id)
    width, height = image_dimensions(body.image_size)
    _check_output_pixels(width, height, settings)
    steps = _steps(body.num_inference_steps, model.max_steps, model.default_steps, model.id)
    size_arg: str | tuple[int, int] = (
        body.image_size if isinstance(body.image_size, str) else (width, height)
    )
    call = text_to_image_call(
        model,
        prompt=body.prompt,
        image_size=size_arg,
        num_images=body.num_images,
        num_inference_steps=steps,
        guidance_scale=body.guidance_scale,
        output_format=body.output_format,
        seed=body.seed,
    )
    estimate = price_images([(width, height)] * body.num_images, model.unit_price)
    return Job(
        operation=GENERATE,
        model_id=model.id,
        call=call,
        estimate=estimate,
        image_size=(width, height),
        output_format=body.output_format,
        prompt=body.prompt,
        seed=body.seed,
    )


def plan_transform(
    catalog: Catalog, settings: Settings, key: ApiKey, body: TransformRequest
) -> Job:
    """Priced from the requested size alone: the input is fitted to it before it is sent."""
    model = catalog.transform_model(body.model)
    key.check_model(model.id)
    width, height = image_dimensions(body.image_size)
    _check_output_pixels(width, height, settings)
    steps = _steps(body.num_inference_steps, model.max_steps, model.default_steps, model.id)
    estimate = price_images([(width, height)] * body.num_images, catalog.transform_unit_price)
    placeholder = image_to_image_call(
        model,
        image_url="",
        prompt=body.prompt,
        image_size=(width, height),
        strength=body.strength,
        num_images=body.num_images,
        num_inference_steps=steps,
        output_format=body.output_format,
        seed=body.seed,
    )
    return Job(
        operation=TRANSFORM,
        model_id=model.id,
        call=placeholder,
        estimate=estimate,
        image_size=(width, height),
        output_format=body.output_format,
        prompt=body.prompt,
        seed=body.seed,
    )


async def prepare_transform_input(job: Job, image_url: str, settings: Settings, http: Any) -> None:
    """Fetch the input safely, fit it to the output size, and send exactly those bytes."""
    image = await load_input_image(image_url, settings, client=http)
    # Decoding and resizing take milliseconds to seconds of CPU: keep them off the event loop.
    fitted = await asyncio.to_thread(fit_to_size, image, *job.image_size)
    args = dict(job.call.arguments)
    args["image_url"] = await asyncio.to_thread(to_data_uri, fitted)
    job.call = UpstreamCall(endpoint=job.call.endpoint, arguments=args)


async def plan_upscale(
    catalog: Catalog, settings: Settings, key: ApiKey, body: UpscaleRequest, http: Any
) -> Job:
    """Upscale output is the input size times the scale, so the input is measured first."""
    upscaler = catalog.upscaler(body.model)
    key.check_model(upscaler.id)
    image = await load_input_image(body.image_url, settings, client=http)
    width, height = image.width * body.scale, image.height * body.scale
    if width * height > settings.max_output_pixels_upscale:
        raise PayloadTooLarge(
            f"Upscaled output {width}x{height} is over "
            f"{settings.max_output_megapixels_upscale} megapixels.",
            param="image_url",
        )
    call = upscale_call(
        upscaler,
        image_url=await asyncio.to_thread(to_data_uri, image),
        scale=body.scale,
        output_format=body.output_format,
    )
    return Job(
        operation=UPSCALE,
        model_id=upscaler.id,
        call=call,
        estimate=price_images([(width, height)], catalog.upscale_unit_price),
        image_size=(width, height),
        output_format=body.output_format,
    )


def filled_images(job: Job, result: UpstreamResult) -> list[GeneratedImage]:
    """fal's images with width, height and content type always filled in.

    Upscalers such as topaz omit the size; the output is then the size that was priced.
    """
    default_type = f"image/{job.output_format}"
    return [
        GeneratedImage(
            url=img.url,
            width=img.width or job.image_size[0],
            height=img.height or job.image_size[1],
            content_type=img.content_type or default_type,
        )
        for img in result.images
    ]


def actual_price(job: Job, images: list[GeneratedImage]) -> Price:
    sizes = [(img.width or 0, img.height or 0) for img in images]
    return price_images(sizes, job.estimate.unit_price)


async def _settle(meter: Any, admission: Any, actual: Price) -> Any:
    """Settle, retrying through a short Redis outage: fal has done (and billed) the work, so
    giving up early would leave the charge to the sweeper's much later age rule."""
    delay = 0.05
    deadline = time.monotonic() + SETTLE_RETRY_S
    while True:
        try:
            return await meter.settle(admission, actual)
        except Unavailable as exc:
            if time.monotonic() + delay > deadline:
                raise Unavailable(
                    "The images were generated but the gateway's state store is unavailable; "
                    "the charge will be recorded when it is back. Try again shortly.",
                    headers={"Retry-After": "1"},
                ) from exc
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)


async def execute(
    job: Job,
    key: ApiKey,
    request_id: str,
    *,
    meter: Any,
    gate: Any,
    fal: Any,
    inflight: InflightTracker,
) -> Outcome:
    """Admit, forward and settle one job; the hold is released on every failure path."""
    with inflight.track():
        return await _execute(
            job, key, request_id, meter=meter, gate=gate, fal=fal, inflight=inflight
        )


async def _admit_and_reserve(job: Job, key: ApiKey, request_id: str, meter: Any, gate: Any) -> Any:
    """Admission and a first try for an upstream slot, in ONE Redis round trip.

    The two scripts live on different Cluster slots so they cannot be one script; they are
    pipelined instead. Refused requests give the slot straight back; a slot not granted at once
    is waited for (polling) only after the request was admitted.
    """
    request = AdmitRequest(
        key.id, request_id, job.model_id, job.operation, job.estimate, job.call.endpoint
    )
    admit_reply, gate_reply = await run_together(
        meter.redis, meter.admit_call(request), gate.acquire_call(key.id, request_id)
    )
    try:
        admission = meter.admission_from(admit_reply, request)
    except BaseException:
        await asyncio.shield(gate.release(request_id))
        raise
    if not gate.granted(gate_reply):
        try:
            await gate.acquire(key.id, request_id)
        except BaseException:
            await asyncio.shield(_release_all(meter, gate, admission, "failed"))
            raise
    return admission


async def _release_all(meter: Any, gate: Any, admission: Any, reason: str) -> None:
    """Give back the slot and the hold, in one round trip (failure and cancellation paths)."""
    _, hold_reply = await run_together(
        meter.redis, gate.release_call(admission.request_id), meter.release_call(admission, reason)
    )
    meter.settlement_from(hold_reply)


async def _release_once_admitted(admitting: asyncio.Future[Any], meter: Any, gate: Any) -> None:
    try:
        admission = await admitting
    except Exception:  # refused (401/402/429) or the store failed: nothing is held
        return
    with contextlib.suppress(Exception):  # the caller is gone; a failure here has no one to tell
        await _release_all(meter, gate, admission, "cancelled")


async def _settle_and_free(meter: Any, gate: Any, admission: Any, actual: Price) -> Any:
    """Settle the hold and free the upstream slot in one round trip; if Redis is briefly
    unreachable, keep trying to settle (the slot's lease frees it anyway)."""
    try:
        _, settle_reply = await run_together(
            meter.redis,
            gate.release_call(admission.request_id),
            meter.settle_call(admission, actual),
        )
        return meter.settlement_from(settle_reply)
    except Unavailable:
        with contextlib.suppress(Unavailable):
            await gate.release(admission.request_id)
        return await _settle(meter, admission, actual)


async def _execute(
    job: Job,
    key: ApiKey,
    request_id: str,
    *,
    meter: Any,
    gate: Any,
    fal: Any,
    inflight: InflightTracker,
) -> Outcome:
    admitting = asyncio.ensure_future(_admit_and_reserve(job, key, request_id, meter, gate))
    try:
        admission = await inflight.shield(admitting)
    except asyncio.CancelledError:
        # The caller went away while admission was under way: the script may have placed the
        # hold already, and nothing else would ever release it (nor free its in-flight slot)
        # while this process lives. Let it finish, then give the hold back.
        await inflight.shield(_release_once_admitted(admitting, meter, gate))
        raise
    upstream_id: list[str] = []

    async def on_submitted(fal_request_id: str) -> None:
        upstream_id.append(fal_request_id)
        try:
            attached = await meter.attach_upstream(admission, fal_request_id)
        except Unavailable:
            # fal has the job and the hold is in place: carry on and settle at the end. Only a
            # crash before that would leave the sweeper unable to ask fal for the outcome.
            log.warning("could not record fal's request id %s", fal_request_id)
            return
        if attached is False:
            # A sweeper already resolved this hold: nothing could bill the job, so stop it.
            raise UpstreamError("The request's hold expired before fal accepted it.")

    try:
        async with gate.renewing(request_id):
            result: UpstreamResult = await fal.run(job.call, on_submitted=on_submitted)
    except BaseException:
        # Released even when the caller went away (cancellation): the release is shielded,
        # and counted in flight so a shutdown waits for it.
        await inflight.shield(_release_all(meter, gate, admission, "failed"))
        raise
    images = filled_images(job, result)
    settlement = await inflight.shield(
        _settle_and_free(meter, gate, admission, actual_price(job, images))
    )
    record_settled(job.model_id, settlement.charged)
    return Outcome(
        job=job,
        images=images,
        seed=result.seed if result.seed is not None else job.seed,
        charged=settlement.charged,
        remaining=settlement.remaining,
        headers=dict(admission.headers),
        upstream_request_id=result.request_id or (upstream_id[0] if upstream_id else None),
    )
