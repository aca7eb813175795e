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
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from app.catalog import Catalog, Price, price_images
from app.catalog.adapters import image_to_image_call, text_to_image_call, upscale_call
from app.errors import FalgateError, InvalidRequest, PayloadTooLarge, Unavailable, UpstreamError
from app.generation.schemas import (
    GenerateRequest,
    TransformRequest,
    UpscaleRequest,
    image_dimensions,
)
from app.images import fit_to_size, load_input_image, to_data_uri
from app.keys.service import ApiKey
from app.metering.deferred import DeferredWrites
from app.metering.leases import LeaseKeeper
from app.metering.lua import ScriptCall, run_together
from app.metering.meter import Admission, AdmitRequest, Meter, Settlement, note_reinstated
from app.metering.sweeper import Sweeper
from app.ops.metrics import record_settled
from app.ops.shutdown import InflightTracker
from app.ratelimit.upstream_gate import UpstreamGate
from app.settings import Settings
from app.upstream.client import FalClient
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
    result: UpstreamResult | None = None  # fal's output as fal sent it (fal's own API)


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


@dataclass(frozen=True)
class MoneyPath:
    """Everything the one money path (admit -> forward -> settle) talks to; the lifespan
    builds it once per process."""

    meter: Meter
    gate: UpstreamGate
    fal: FalClient
    inflight: InflightTracker
    leases: LeaseKeeper
    deferred: DeferredWrites
    resolver: Sweeper


@dataclass(frozen=True)
class Submitted:
    """A job in fal's queue, handed to the resolver: settled when fal finishes it."""

    request_id: str
    upstream_request_id: str
    admission: Admission


def _accepted(exc: FalgateError, request_id: str) -> FalgateError:
    """The error for the client when fal accepted the job and the gateway gave up on it:
    the same status, and where to learn the outcome (nothing is released on a guess)."""
    message = (
        f"{exc.message} fal accepted this job; the gateway asked fal to cancel it and records "
        f"whatever fal produced: GET /v1/requests/{request_id} tells the outcome."
    )
    accepted = type(exc)(message, param=exc.param, headers=exc.headers, extra=exc.extra)
    accepted.__cause__ = exc
    return accepted


async def submit(job: Job, key: ApiKey, request_id: str, path: MoneyPath) -> Submitted:
    """Admit a job and put it in fal's queue, then return at once (fal's own queue API).

    The same admission as :func:`execute`; once fal accepted the job its hold is handed to
    the resolver, which settles it when fal finishes, whether or not the client ever asks for
    the result (and releases it if fal cancels or fails it without output).
    """
    with path.inflight.track():
        async with _admitted(job, key, request_id, path) as admission:
            try:
                fal_request_id = await path.fal.submit(job.call)
            except BaseException as exc:
                reason = "cancelled" if isinstance(exc, asyncio.CancelledError) else "failed"
                await path.inflight.shield(_release_all(path, admission, reason))
                raise
            calls = (
                path.gate.release_call(request_id),
                path.meter.detached_call(admission, fal_request_id),
            )
            try:
                _, handoff = await path.inflight.shield(run_together(path.meter.scripts, *calls))
                path.meter.handed_over(handoff, admission, fal_request_id)
            except Unavailable:
                path.deferred.later(*calls)
        return Submitted(request_id, fal_request_id, admission)


async def execute(job: Job, key: ApiKey, request_id: str, path: MoneyPath) -> Outcome:
    """Admit, forward and settle one job.

    Before fal accepted the job every failure releases the hold; after, the hold is settled
    to what fal produced, or marked ``unresolved`` for the resolver to settle or release from
    fal's answer (SPEC section 10).
    """
    with path.inflight.track():
        return await _execute(job, key, request_id, path)


def _admit_request(job: Job, key: ApiKey, request_id: str) -> AdmitRequest:
    return AdmitRequest(
        key.id,
        request_id,
        job.model_id,
        job.operation,
        job.estimate,
        job.call.endpoint,
        prompt=job.prompt,
    )


async def _admit_and_reserve(request: AdmitRequest, path: MoneyPath) -> tuple[Admission, bool]:
    """Admission and a first try for an upstream slot, in ONE Redis round trip.

    The two scripts live on different Cluster slots so they cannot be one script; they are
    pipelined instead. Refused requests give the slot straight back. Returns the admission and
    whether the slot was granted at once. If Redis does not answer, the admission may still
    have run (or still run later): its release by id is retried until Redis answers.
    """
    meter, gate = path.meter, path.gate
    try:
        admit_reply, gate_reply = await run_together(
            meter.scripts,
            meter.admit_call(request),
            gate.acquire_call(request.key_id, request.request_id),
        )
    except Unavailable:
        path.deferred.later(
            gate.release_call(request.request_id),
            meter.release_id_call(request.key_id, request.request_id, "admission_lost"),
        )
        raise
    try:
        admission = meter.admission_from(admit_reply, request)
    except BaseException:
        await asyncio.shield(gate.release(request.request_id))
        raise
    return admission, gate.granted(gate_reply)


async def _release_all(path: MoneyPath, admission: Admission, reason: str) -> None:
    """Give back the slot and the hold, in one round trip (before fal accepted the job); if
    Redis does not answer, keep trying in the background."""
    outcome = "cancelled" if reason == "cancelled" else "failed"
    calls = (
        path.gate.release_call(admission.request_id),
        path.meter.release_call(admission, reason, outcome),
    )
    try:
        _, hold_reply = await run_together(path.meter.scripts, *calls)
        path.meter.settlement_from(hold_reply)
    except Unavailable:
        path.deferred.later(*calls)


async def _give_up(path: MoneyPath, admission: Admission, fal_request_id: str) -> None:
    """fal accepted the job and the request path stops following it: free the slot and leave
    the hold to the resolver (``unresolved``), now or as soon as Redis answers."""
    calls = (
        path.gate.release_call(admission.request_id),
        path.meter.unresolved_call(admission, fal_request_id),
    )
    try:
        _, handoff = await run_together(path.meter.scripts, *calls)
        path.meter.handed_over(handoff, admission, fal_request_id)
    except Unavailable:
        path.deferred.later(*calls)


async def _release_once_admitted(
    admitting: asyncio.Future[tuple[Admission, bool]], path: MoneyPath
) -> None:
    try:
        admission, _ = await admitting
    except Exception:  # refused (401/402/429) or the store failed (its release is deferred)
        return
    await _release_all(path, admission, "cancelled")


async def _settle_and_free(
    path: MoneyPath,
    admission: Admission,
    actual: Price,
    images: list[GeneratedImage],
    seed: int | None,
    upstream: str | None,
) -> Settlement:
    """Settle the hold and free the upstream slot in one round trip; if Redis is briefly
    unreachable, keep trying to settle (fal did, and billed, the work)."""
    meter, gate = path.meter, path.gate
    settle = meter.settle_call(admission, actual, images, seed, upstream)
    delay = 0.05
    deadline = time.monotonic() + SETTLE_RETRY_S
    calls: tuple[ScriptCall, ...] = (gate.release_call(admission.request_id), settle)
    while True:
        try:
            replies = await run_together(meter.scripts, *calls)
            settlement = meter.settlement_from(replies[-1])
            if settlement.reinstated:
                note_reinstated(admission.request_id, upstream)
            return settlement
        except Unavailable as exc:
            if time.monotonic() + delay > deadline:
                # Still retried in the background, with the hold's lease kept alive meanwhile:
                # in sync mode fal's id is unknown and the resolver could only release it.
                path.deferred.later(*calls)
                raise Unavailable(
                    "The images were generated but the gateway's state store is unavailable; "
                    "the charge will be recorded when it is back. Try again shortly.",
                    headers={"Retry-After": "1"},
                ) from exc
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)


@contextlib.asynccontextmanager
async def _admitted(
    job: Job, key: ApiKey, request_id: str, path: MoneyPath
) -> AsyncIterator[Admission]:
    """Admitted, with an upstream slot, the hold's lease renewed while the block runs; a
    failure before the block (refusal, no slot in time) leaves nothing held."""
    admitting = asyncio.ensure_future(
        _admit_and_reserve(_admit_request(job, key, request_id), path)
    )
    try:
        admission, granted = await path.inflight.shield(admitting)
    except asyncio.CancelledError:
        # The caller went away while admission was under way: the script may have placed the
        # hold already. Let it finish, then give the hold back.
        await path.inflight.shield(_release_once_admitted(admitting, path))
        raise
    with path.leases.keep(key.id, request_id):
        if not granted:
            try:
                await path.gate.acquire(key.id, request_id)
            except BaseException:
                await path.inflight.shield(_release_all(path, admission, "failed"))
                raise
        yield admission


async def _execute(job: Job, key: ApiKey, request_id: str, path: MoneyPath) -> Outcome:
    async with _admitted(job, key, request_id, path) as admission:
        return await _forward(job, admission, path)


class _Attachment:
    """fal's request id, recorded on the hold while fal works (``FalClient.run``'s
    ``on_submitted``).

    The command leaves the moment fal accepted the job, as before, so a crash while fal works
    is still billed from fal's answer; but the request goes on following the job instead of
    waiting a Redis round trip for the reply (issue 15). A hold the resolver released as
    abandoned meanwhile (its lease ran out before fal accepted the job) is put back by the
    command itself (``reinstate.lua``). A reply that the hold is gone (resolved otherwise:
    nothing can bill the job) interrupts the following, and fal is told to cancel, as when
    the reply was awaited first.
    """

    def __init__(self, meter: Meter, admission: Admission) -> None:
        self._meter, self._admission = meter, admission
        self.fal_request_id: str | None = None
        self._recording: asyncio.Task[bool] | None = None
        self._following: asyncio.Task[Any] | None = None
        self._interrupted = False

    async def on_submitted(self, fal_request_id: str) -> None:
        self.fal_request_id = fal_request_id
        self._following = asyncio.current_task()
        self._recording = asyncio.ensure_future(
            self._meter.attach_upstream(self._admission, fal_request_id)
        )
        self._recording.add_done_callback(self._replied)

    def _replied(self, recording: asyncio.Task[bool]) -> None:
        if recording.cancelled() or recording.exception() is not None or recording.result():
            return
        if self._following is not None:  # the hold is gone: stop following a job nobody bills
            self._interrupted = True
            self._following.cancel()

    def stop_following(self) -> None:
        self._following = None

    def interrupted(self) -> bool:
        """True (and the cancellation taken back) if the reply cancelled the following."""
        if not self._interrupted:
            return False
        self._interrupted = False
        current = asyncio.current_task()
        if current is not None:
            current.uncancel()
        return True

    async def recorded(self) -> bool:
        """Wait for the reply: False if the hold was gone (nothing can bill the job). A failed
        write counts as recorded: the hold is still there, and the settle or the hand-off to
        the resolver carries fal's id too."""
        if self._recording is None:
            return True
        try:
            return await asyncio.shield(self._recording)
        except Exception as exc:  # Unavailable, or a reply the meter did not expect
            log.warning("could not record fal's request id %s: %s", self.fal_request_id, exc)
            return True


async def _forward(job: Job, admission: Admission, path: MoneyPath) -> Outcome:
    request_id = admission.request_id
    attachment = _Attachment(path.meter, admission)
    try:
        try:
            result: UpstreamResult = await path.fal.run(
                job.call, on_submitted=attachment.on_submitted
            )
        except asyncio.CancelledError:
            if not attachment.interrupted():
                raise
        finally:
            attachment.stop_following()
        if not await attachment.recorded():
            attachment.fal_request_id = None  # nothing holds money for it: release, not hand off
            raise UpstreamError("The request's hold was resolved before fal accepted it.")
    except BaseException as exc:
        # Shielded and counted in flight, so that neither a client hanging up nor a shutdown
        # cuts the bookkeeping short.
        accepted = attachment.fal_request_id
        if accepted is not None and not await path.inflight.shield(attachment.recorded()):
            accepted = None
        if accepted is None:
            reason = "cancelled" if isinstance(exc, asyncio.CancelledError) else "failed"
            await path.inflight.shield(_release_all(path, admission, reason))
            raise
        await path.inflight.shield(_give_up(path, admission, accepted))
        if isinstance(exc, FalgateError):
            raise _accepted(exc, request_id) from exc
        raise
    images = filled_images(job, result)
    seed = result.seed if result.seed is not None else job.seed
    upstream_id = result.request_id or attachment.fal_request_id
    settlement = await path.inflight.shield(
        _settle_and_free(path, admission, actual_price(job, images), images, seed, upstream_id)
    )
    record_settled(job.model_id, settlement.charged, admission.key_id)
    return Outcome(
        job=job,
        images=images,
        seed=seed,
        charged=settlement.charged,
        remaining=settlement.remaining,
        headers=dict(admission.headers),
        upstream_request_id=upstream_id,
        result=result,
    )
