"""Client routes (SPEC section 3): run, generate, transform, upscale, and their prices."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Body, Header, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from app.catalog import Catalog, Price
from app.deps import CatalogDep, CurrentKey, SettingsDep
from app.errors import ClientClosedRequest, UpstreamError, request_id_of
from app.fastjson import FastJSONResponse
from app.generation import service
from app.generation.schemas import (
    GenerateRequest,
    GenerateResponse,
    PriceResponse,
    TransformRequest,
    UpscaleRequest,
    UpscaleResponse,
)
from app.metering.http import idempotent
from app.metering.idempotency import KEY_PATTERN, MAX_KEY_LENGTH
from app.metering.meter import RequestRecord
from app.money import display_price, format_usd
from app.ops.edge import DISCONNECT_EXTENSION, DisconnectSignal
from app.routing import FlatRoute
from app.schemas import METERED, error_responses
from app.settings import Settings

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])
DEFAULT_MODEL = "fal-ai/flux/dev"

router = APIRouter(prefix="/v1", tags=["generation"], route_class=FlatRoute)

_RUN_ERRORS = error_responses(400, 401, 402, 403, 404, 409, 413, 429, 502, 503, 504)
_PRICE_ERRORS = error_responses(400, 401, 403, 404, 413, 503)


def _price_route(path: str, operation_id: str, summary: str) -> Callable[[F], F]:
    """A price route: the estimate for a body, nothing charged."""
    return router.post(
        path,
        operation_id=operation_id,
        response_model=PriceResponse,
        responses=_PRICE_ERRORS,
        summary=summary,
    )


def _metered_route(
    path: str, operation_id: str, response_model: type[BaseModel], summary: str
) -> Callable[[F], F]:
    """A metered route: admitted, forwarded to fal, settled; idempotent with the header."""
    return router.post(
        path,
        operation_id=operation_id,
        response_model=response_model,
        responses={200: {"headers": METERED}, **_RUN_ERRORS},
        summary=summary,
    )


def _configuration(request: Request) -> tuple[Catalog, Settings]:
    """The catalog and settings, read from the app state: on the metered routes, in place of
    two dependencies that FastAPI would solve on every request (issue 15)."""
    state = request.app.state
    return state.catalog, state.settings


def _price_body(job: service.Job) -> PriceResponse:
    price: Price = job.estimate
    return PriceResponse(
        price=display_price(price.amount),
        amount_usd=format_usd(price.amount),
        megapixels=float(price.megapixels),
        model=job.model_id,
        unit_price_usd_per_mp=format_usd(price.unit_price),
    )


async def _until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run ``work``, cancelling it if the client goes away (so fal's job is cancelled too).

    The work runs inline in the request's own task. Under ``falgate serve`` the edge
    (:class:`app.ops.edge.DisconnectSignal`) cancels that task when the connection is lost, at
    no cost per request; under another server one watcher task waits for ``http.disconnect``.
    A cancellation from anywhere else (shutdown grace ran out) propagates as is.
    """
    current = asyncio.current_task()
    assert current is not None
    gone = False

    def leave() -> None:
        nonlocal gone
        gone = True
        current.cancel()

    signal = request.scope.get("extensions", {}).get(DISCONNECT_EXTENSION)
    watcher: asyncio.Task[None] | None = None
    if isinstance(signal, DisconnectSignal):
        if signal.lost:
            raise ClientClosedRequest("The client closed the connection before the answer.")
        signal.on_loss(leave)
    else:

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            leave()

        watcher = asyncio.get_running_loop().create_task(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if not gone:
            raise
        current.uncancel()
        raise ClientClosedRequest("The client closed the connection before the answer.") from None
    finally:
        if watcher is not None:
            watcher.cancel()
        elif isinstance(signal, DisconnectSignal):
            signal.on_loss(None)


async def execute_metered(request: Request, key: Any, job: service.Job) -> service.Outcome:
    """Run a job on the money path for this request (cancelled if the client goes away)."""
    state = request.app.state
    request.state.model = job.model_id
    request.state.prompt = job.prompt
    outcome = await _until_disconnect(
        request,
        service.execute(job, key, request_id_of(request), state.money),
    )
    request.state.cost_micro = outcome.charged
    request.state.upstream_request_id = outcome.upstream_request_id
    return outcome


def _cost(outcome: service.Outcome) -> dict[str, Any]:
    pixels = sum((img.width or 0) * (img.height or 0) for img in outcome.images)
    return {"amount_usd": format_usd(outcome.charged), "megapixels": pixels / 1_000_000}


def metered_response(
    request: Request, outcome: service.Outcome, body: dict[str, Any]
) -> JSONResponse:
    headers = {"X-Request-Id": request_id_of(request), "X-Cost-USD": format_usd(outcome.charged)}
    if outcome.remaining is not None:
        headers["X-Budget-Remaining-USD"] = format_usd(outcome.remaining)
    headers.update(outcome.headers)
    return FastJSONResponse(body, headers=headers)


def _image_json(img: Any) -> dict[str, Any]:
    return {
        "url": img.url,
        "width": img.width,
        "height": img.height,
        "content_type": img.content_type,
    }


def _generated(request: Request, outcome: service.Outcome) -> JSONResponse:
    body = {
        "images": [_image_json(img) for img in outcome.images],
        "seed": outcome.seed,
        "prompt": outcome.job.prompt,
        "cost": _cost(outcome),
    }
    return metered_response(request, outcome, body)


def _replay(record: RequestRecord) -> JSONResponse:
    """The response of a first attempt that completed, rebuilt from its request record (for
    an ``Idempotency-Key`` retry whose first response was never stored)."""
    images = [_image_json(img) for img in record.images or []]
    cost = {
        "amount_usd": format_usd(record.charged or 0),
        "megapixels": (record.pixels or 0) / 1_000_000,
    }
    body: dict[str, Any]
    if record.operation == service.UPSCALE:
        body = {"image": images[0] if images else None, "cost": cost}
    else:
        body = {"images": images, "seed": record.seed, "prompt": record.prompt, "cost": cost}
    headers = {"X-Request-Id": record.request_id, "X-Cost-USD": format_usd(record.charged or 0)}
    if record.remaining is not None and record.remaining >= 0:
        headers["X-Budget-Remaining-USD"] = format_usd(record.remaining)
    return FastJSONResponse(body, headers=headers)


GenerateBody = Annotated[GenerateRequest, Body()]
# Declared for the OpenAPI document; ``idempotent`` reads the header itself.
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=MAX_KEY_LENGTH,
        pattern=KEY_PATTERN,
        description="Retry safely: the same key and body within 24 h returns the first "
        "response without a second charge; a different body answers 409.",
    ),
]


@_price_route(
    "/run/{model_id:path}/price", "priceRun", "Price a text-to-image request on a given model"
)
async def price_run(
    model_id: str, body: GenerateBody, key: CurrentKey, catalog: CatalogDep, settings: SettingsDep
) -> PriceResponse:
    return _price_body(service.plan_generate(catalog, settings, key, model_id, body))


@_metered_route("/run/{model_id:path}", "run", GenerateResponse, "Text-to-image on a given model")
async def run(
    request: Request,
    model_id: str,
    body: GenerateBody,
    key: CurrentKey,
    _idempotency_key: IdempotencyKey = None,
) -> Response:
    catalog, settings = _configuration(request)

    async def handle() -> Response:
        job = service.plan_generate(catalog, settings, key, model_id, body)
        return _generated(request, await execute_metered(request, key, job))

    return await idempotent(request, key.id, handle, _replay)


@_price_route("/generate/price", "priceGenerate", "Price a text-to-image request")
async def price_generate(
    body: GenerateBody, key: CurrentKey, catalog: CatalogDep, settings: SettingsDep
) -> PriceResponse:
    job = service.plan_generate(catalog, settings, key, body.model or DEFAULT_MODEL, body)
    return _price_body(job)


@_metered_route("/generate", "generate", GenerateResponse, "Text-to-image (model in the body)")
async def generate(
    request: Request,
    body: GenerateBody,
    key: CurrentKey,
    _idempotency_key: IdempotencyKey = None,
) -> Response:
    catalog, settings = _configuration(request)

    async def handle() -> Response:
        job = service.plan_generate(catalog, settings, key, body.model or DEFAULT_MODEL, body)
        return _generated(request, await execute_metered(request, key, job))

    return await idempotent(request, key.id, handle, _replay)


@_price_route("/transform/price", "priceTransform", "Price an image-to-image request")
async def price_transform(
    body: Annotated[TransformRequest, Body()],
    key: CurrentKey,
    catalog: CatalogDep,
    settings: SettingsDep,
) -> PriceResponse:
    return _price_body(service.plan_transform(catalog, settings, key, body))


@_metered_route("/transform", "transform", GenerateResponse, "Image-to-image")
async def transform(
    request: Request,
    body: Annotated[TransformRequest, Body()],
    key: CurrentKey,
    _idempotency_key: IdempotencyKey = None,
) -> Response:
    catalog, settings = _configuration(request)

    async def handle() -> Response:
        job = service.plan_transform(catalog, settings, key, body)
        await service.prepare_transform_input(job, body.image_url, settings, request.app.state.http)
        return _generated(request, await execute_metered(request, key, job))

    return await idempotent(request, key.id, handle, _replay)


@_price_route(
    "/upscale/price", "priceUpscale", "Price an upscale (fetches the input to learn its size)"
)
async def price_upscale(
    request: Request,
    body: Annotated[UpscaleRequest, Body()],
    key: CurrentKey,
    catalog: CatalogDep,
    settings: SettingsDep,
) -> PriceResponse:
    job = await service.plan_upscale(catalog, settings, key, body, request.app.state.http)
    return _price_body(job)


@_metered_route("/upscale", "upscale", UpscaleResponse, "Upscale an image by 2 or 4")
async def upscale(
    request: Request,
    body: Annotated[UpscaleRequest, Body()],
    key: CurrentKey,
    _idempotency_key: IdempotencyKey = None,
) -> Response:
    catalog, settings = _configuration(request)

    async def handle() -> Response:
        job = await service.plan_upscale(catalog, settings, key, body, request.app.state.http)
        outcome = await execute_metered(request, key, job)
        if not outcome.images:
            raise UpstreamError("fal returned no image.")
        image = _image_json(outcome.images[0])
        return metered_response(request, outcome, {"image": image, "cost": _cost(outcome)})

    return await idempotent(request, key.id, handle, _replay)
