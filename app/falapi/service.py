"""fal's own API on falgate: a fal model input becomes the same :class:`service.Job` as ``/v1``.

The fal surface does not price or forward anything itself. A request names a fal endpoint id
from the catalog and carries fal's input fields. The price-deciding ones (``image_size``,
``num_images``, the upscale factor, the input image) are validated by the ``/v1`` request
models and planned by ``app.generation.service.plan_*``, so the SSRF, size and price rules are
the same ones. The other fields the catalog lists for the endpoint are passed on as sent, and
any other field is refused.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qs, urlsplit

from pydantic import BaseModel, ValidationError

from app.catalog import Catalog
from app.catalog.catalog import FalEndpoint
from app.errors import FalgateError, InvalidRequest, NotFound, UnsupportedFeature
from app.generation import service
from app.generation.schemas import GenerateRequest, TransformRequest, UpscaleRequest
from app.images import fit_to_size, load_input_image, to_data_uri
from app.keys.service import ApiKey
from app.metering.lua import store_errors
from app.metering.meter import Meter, RequestRecord
from app.settings import Settings
from app.upstream.client import FalClient
from app.upstream.types import GeneratedImage, UpstreamCall

log = logging.getLogger("falgate.falapi")

#: Fields whose value decides what is generated and so what it costs: always sent to fal as
#: the gateway validated (and, for images, measured) them, whether or not the client sent them.
_PRICED = frozenset({"prompt", "image_size", "num_images", "image_url"})
#: fal hosts the proxy route forwards for (what ``@fal-ai/server-proxy`` accepts, minus storage).
RUN_HOST, QUEUE_HOST = "fal.run", "queue.fal.run"
TARGET_HEADER = "x-fal-target-url"
_STORAGE_HOSTS = frozenset({"rest.fal.ai", "rest.alpha.fal.ai"})
_NAMESPACES = ("workflows", "comfy")
M = TypeVar("M", bound=BaseModel)


def parse_input(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object (fal's model input); lossless for big seeds."""
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise _invalid([], "Request body is not valid JSON.", "json_invalid") from exc
    if not isinstance(body, dict):
        raise _invalid([], "Input should be a JSON object.", "model_attributes_type")
    return body


def refuse_unsupported(query: Mapping[str, Any]) -> None:
    """Webhooks are not served yet: say so instead of silently never calling them."""
    if "fal_webhook" in query:
        raise UnsupportedFeature(
            "fal_webhook is not supported by this gateway: poll the status_url (or use "
            "subscribe) instead.",
            param="fal_webhook",
        )


def _invalid(loc: list[str | int], msg: str, type_: str) -> InvalidRequest:
    """A 422 in FastAPI's shape, as fal's own validation errors are."""
    field = ".".join(str(p) for p in loc) or None
    detail = [{"loc": ["body", *loc], "msg": msg, "type": type_}]
    text = f"Invalid value for '{field}': {msg}" if field else msg
    return InvalidRequest(text, param=field, extra={"detail": detail})


def _validated(model: type[M], values: dict[str, Any], names: dict[str, str]) -> M:
    """``model`` from ``values``; errors name the fields as the client sent them (``names``
    maps a ``/v1`` field to its fal name, e.g. ``output_format`` -> ``format``)."""
    try:
        return model.model_validate_json(json.dumps(values))
    except ValidationError as exc:
        detail = []
        for error in exc.errors():
            loc = [
                names.get(str(p), p) if i == 0 else p
                for i, p in enumerate(error["loc"])
                if not (isinstance(p, str) and (p[:1].isupper() or "[" in p))
            ]
            detail.append({"loc": ["body", *loc], "msg": error["msg"], "type": error["type"]})
        first = detail[0]
        field = ".".join(str(p) for p in first["loc"][1:]) or None
        raise InvalidRequest(
            f"Invalid value for '{field}': {first['msg']}" if field else str(first["msg"]),
            param=field,
            extra={"detail": detail},
        ) from exc


def _check_fields(endpoint: FalEndpoint, body: dict[str, Any]) -> None:
    unknown = sorted(set(body) - endpoint.fields)
    if unknown:
        detail = [
            {
                "loc": ["body", name],
                "msg": f"Extra inputs are not permitted for {endpoint.id} on this gateway",
                "type": "extra_forbidden",
            }
            for name in unknown
        ]
        raise InvalidRequest(
            f"Unknown field '{unknown[0]}' for {endpoint.id}.",
            param=unknown[0],
            extra={"detail": detail},
        )


def _pick(body: dict[str, Any], names: dict[str, str], fields: tuple[str, ...]) -> dict[str, Any]:
    """The ``/v1`` fields among ``body``'s (fal-named) fields."""
    return {f: body[names.get(f, f)] for f in fields if names.get(f, f) in body}


def _forwarded(job: service.Job, body: dict[str, Any], priced: frozenset[str]) -> None:
    """What fal gets: the planned values of the priced fields and of the fields the client
    sent (as validated), and every other accepted field as sent. Defaults the client left out
    are fal's own, not ``/v1``'s."""
    planned = job.call.arguments
    args = {k: v for k, v in planned.items() if k in priced or k in body}
    args.update({k: v for k, v in body.items() if k not in planned})
    job.call = UpstreamCall(endpoint=job.call.endpoint, arguments=args)


async def plan(
    catalog: Catalog,
    settings: Settings,
    key: ApiKey,
    endpoint_id: str,
    body: dict[str, Any],
    http: Any,
) -> service.Job:
    """Validate and price a fal input for ``endpoint_id``: the job the money path runs."""
    endpoint = catalog.fal_endpoint(endpoint_id)
    entry = endpoint.model or endpoint.upscaler
    assert entry is not None
    key.check_model(entry.id)  # before any input image is fetched on the key's behalf
    _check_fields(endpoint, body)
    if endpoint.kind == "upscale":
        return await _plan_upscale(catalog, settings, key, endpoint, body, http)
    model = endpoint.model
    assert model is not None
    names = {"output_format": model.format_param}
    if endpoint.kind == "text_to_image":
        values = _pick(
            body,
            names,
            (
                "prompt",
                "image_size",
                "num_images",
                "num_inference_steps",
                "guidance_scale",
                "output_format",
                "seed",
            ),
        )
        values.setdefault("image_size", model.fal_image_size)
        request = _validated(GenerateRequest, values, names)
        job = service.plan_generate(catalog, settings, key, model.id, request)
    else:
        job = await _plan_image_to_image(catalog, settings, key, endpoint, body, names, http)
    _forwarded(job, body, _PRICED)
    return job


async def _plan_image_to_image(
    catalog: Catalog,
    settings: Settings,
    key: ApiKey,
    endpoint: FalEndpoint,
    body: dict[str, Any],
    names: dict[str, str],
    http: Any,
) -> service.Job:
    """Priced by the output size: the requested ``image_size``, or for endpoints without one
    (flux dev's image-to-image) the input's own size. The input is fetched once, fitted to
    that size and sent as those exact bytes."""
    model = endpoint.model
    assert model is not None
    values = _pick(
        body,
        names,
        (
            "image_url",
            "prompt",
            "image_size",
            "strength",
            "num_inference_steps",
            "num_images",
            "output_format",
            "seed",
        ),
    )
    takes_size = "image_size" in endpoint.fields
    if takes_size:
        values.setdefault("image_size", model.fal_image_size)
    values["model"] = model.id
    probe = dict(values)
    probe.setdefault("image_size", "square")  # validated below once the input is measured
    request = _validated(TransformRequest, probe, names)
    image = await load_input_image(request.image_url, settings, client=http)
    if not takes_size:
        size = {"width": image.width, "height": image.height}
        try:
            request = TransformRequest.model_validate_json(
                json.dumps({**values, "image_size": size})
            )
        except ValidationError as exc:
            raise _invalid(
                ["image_url"],
                f"The input image is {image.width}x{image.height}; {endpoint.id} keeps the "
                "input's size, which must be 64..4096 px per side here.",
                "value_error",
            ) from exc
    job = service.plan_transform(catalog, settings, key, request)
    fitted = await asyncio.to_thread(fit_to_size, image, *job.image_size)
    args = dict(job.call.arguments)
    args["image_url"] = await asyncio.to_thread(to_data_uri, fitted)
    job.call = UpstreamCall(endpoint=job.call.endpoint, arguments=args)
    return job


async def _plan_upscale(
    catalog: Catalog,
    settings: Settings,
    key: ApiKey,
    endpoint: FalEndpoint,
    body: dict[str, Any],
    http: Any,
) -> service.Job:
    upscaler = endpoint.upscaler
    assert upscaler is not None
    names = {"scale": upscaler.factor_param}
    values = _pick(body, names, ("image_url", "scale", "output_format"))
    factor = values.get("scale")
    if isinstance(factor, float) and factor.is_integer():
        values["scale"] = int(factor)  # fal's factors are floats; the gateway prices 2 or 4
    values["model"] = upscaler.id
    request = _validated(UpscaleRequest, values, names)
    job = await service.plan_upscale(catalog, settings, key, request, http)
    _forwarded(job, body, _PRICED | {upscaler.factor_param})
    return job


# --- request ids and the proxy convention ---------------------------------------------------


def owner_app(endpoint_id: str) -> str:
    """``fal-ai/flux/dev`` -> ``fal-ai/flux``: the status/result/cancel paths drop the rest."""
    parts = endpoint_id.strip("/").split("/")
    keep = 3 if parts[0] in _NAMESPACES else 2
    return "/".join(parts[:keep])


ProxyKind = Literal["run", "submit", "status", "stream", "result", "cancel"]


@dataclass(frozen=True)
class ProxyTarget:
    """What an ``x-fal-target-url`` asks for, in terms of falgate's own fal routes."""

    kind: ProxyKind
    path: str  # the endpoint id (run, submit) or ``owner/app`` (the request routes)
    request_id: str | None
    query: dict[str, str]


def proxy_target(url: str | None, method: str) -> ProxyTarget:
    """Parse ``x-fal-target-url`` as ``@fal-ai/server-proxy`` would accept it (fal hosts only).

    Storage uploads (``rest.fal.ai``) are refused with a clear message; anything else that is
    not a fal host is a 400, as the server proxy answers.
    """
    if not url:
        raise InvalidRequest(
            "Invalid request: the x-fal-target-url header is missing.", param=TARGET_HEADER
        )
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if host in _STORAGE_HOSTS:
        raise UnsupportedFeature(
            "fal storage uploads are not supported by this gateway: send images as https:// "
            "or data: URLs in the input.",
            param=TARGET_HEADER,
        )
    if parts.scheme != "https" or host not in (RUN_HOST, QUEUE_HOST) or parts.port is not None:
        raise InvalidRequest(
            "Invalid request: x-fal-target-url must be an https://fal.run or "
            "https://queue.fal.run URL.",
            param=TARGET_HEADER,
        )
    query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    path = parts.path.strip("/")
    method = method.upper()
    if host == RUN_HOST:
        if method != "POST":
            raise _method_not_allowed(method, url)
        return ProxyTarget("run", path, None, query)
    segments = path.split("/")
    if "requests" in segments:
        at = segments.index("requests")
        rest = segments[at + 1 :]
        app = "/".join(segments[:at])
        routes: dict[tuple[str, int, str], ProxyKind] = {
            ("GET", 1, ""): "result",
            ("GET", 2, "status"): "status",
            ("GET", 3, "status/stream"): "stream",
            ("PUT", 2, "cancel"): "cancel",
        }
        kind = routes.get((method, len(rest), "/".join(rest[1:])))
        if rest and rest[0] and kind is not None:
            return ProxyTarget(kind, app, rest[0], query)
        raise _method_not_allowed(method, url) if rest and rest[0] else NotFound("No such route.")
    if method != "POST":
        raise _method_not_allowed(method, url)
    return ProxyTarget("submit", path, None, query)


def _method_not_allowed(method: str, url: str) -> InvalidRequest:
    error = InvalidRequest(f"{method} is not allowed for {url[:200]}.")
    error.status_code = 405
    return error


# --- fal-shaped errors ------------------------------------------------------------------------


def fal_error(exc: FalgateError) -> tuple[int, dict[str, Any], dict[str, str]]:
    """``(status, body, headers)`` of an error in fal's shape: ``{"detail", "error_type"}``.

    Validation errors are 422 with FastAPI's ``[{loc, msg, type}]`` (what fal answers and what
    the clients' ``ValidationError``/``FalClientHTTPError`` read); fal features the gateway
    does not serve stay 400. The rest keep the gateway's status (SPEC section 7).
    """
    status = exc.status_code
    detail: Any = exc.message
    validation = exc.param != TARGET_HEADER  # a bad proxy target is a 400, as fal's proxy says
    if isinstance(exc, InvalidRequest) and validation and not isinstance(exc, UnsupportedFeature):
        if status == 400:
            status = 422
        if "detail" in exc.extra:
            detail = exc.extra["detail"]
        elif exc.param is not None and status == 422:
            detail = [
                {"loc": ["body", *exc.param.split(".")], "msg": exc.message, "type": "value_error"}
            ]
    body: dict[str, Any] = {k: v for k, v in exc.extra.items() if k != "detail"}
    body.update({"detail": detail, "error_type": exc.type})
    return status, body, {**exc.headers, "X-Fal-Error-Type": exc.type}


# --- the queue: request records owned by the submitting key ---------------------------------


def record_key(key_id: str, request_id: str) -> str:
    """``{k:<key id>}:fal:<request id>``: in the key's own keyspace, so a request id is only
    ever found by the key that submitted it (any other key gets a 404)."""
    return f"{{k:{key_id}}}:fal:{request_id}"


@dataclass
class QueueRecord:
    """A fal queue request: the fal endpoint it was submitted to and fal's id (this record),
    and how the money path resolved it (its request record: ``GET /v1/requests/{id}``)."""

    request_id: str
    endpoint: str
    fal_request_id: str
    money: RequestRecord | None

    @property
    def status(self) -> str:
        """``pending`` | ``unresolved`` | ``completed`` | ``failed`` | ``cancelled``."""
        return self.money.status if self.money is not None else "pending"

    @property
    def final(self) -> bool:
        return self.money is not None and self.money.resolved


class QueueRecords:
    """Redis-backed records of the fal surface's queue requests."""

    def __init__(self, redis: Any, meter: Meter, ttl_s: int) -> None:
        self.redis = redis
        self.meter = meter
        self.ttl_s = ttl_s  # as long as the money path remembers the request

    async def create(self, key_id: str, request_id: str, endpoint: str, fal_id: str) -> None:
        name = record_key(key_id, request_id)
        with store_errors():
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(name, mapping={"endpoint": endpoint, "fal_request_id": fal_id})
                pipe.expire(name, self.ttl_s)
                await pipe.execute()

    async def get(self, key_id: str, owner_app_path: str, request_id: str) -> QueueRecord:
        """The key's queue request; a 404 for any other key's id (or another app's path)."""
        with store_errors():
            raw = await self.redis.hgetall(record_key(key_id, request_id))
        fields = {_s(k): _s(v) for k, v in raw.items()}
        endpoint = fields.get("endpoint", "")
        if not endpoint or owner_app(endpoint) != owner_app_path.strip("/"):
            raise NotFound("Request not found.")
        money = await self.meter.request_record(key_id, request_id)
        return QueueRecord(request_id, endpoint, fields.get("fal_request_id", ""), money)


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# --- the queue shape ---------------------------------------------------------------------------


class QueueFollower:
    """Watches the jobs this process submitted until the resolver has settled or released
    them, so that a job is billed (and its status turns COMPLETED) as soon as fal finishes,
    whether or not its client comes back. If this process dies, the resolver of any other
    process does the same from the hold's lease; nothing here decides money."""

    def __init__(self, path: service.MoneyPath, settings: Settings) -> None:
        self.path = path
        self.interval_s = settings.upstream_poll_interval_s
        self.deadline_s = settings.upstream_request_timeout_s
        self._tasks: set[asyncio.Task[None]] = set()

    def follow(self, key_id: str, request_id: str) -> None:
        task = asyncio.ensure_future(self._follow(key_id, request_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def resolve(self, key_id: str, request_id: str) -> None:
        """Ask fal now (status, then result) and settle or release if it is done."""
        await self.path.resolver.resolve_one(key_id, request_id, follow=True)

    async def _follow(self, key_id: str, request_id: str) -> None:
        loop = asyncio.get_running_loop()
        until = loop.time() + self.deadline_s
        delay = min(0.02, self.interval_s)
        while loop.time() < until:
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.interval_s)
            try:
                await self.resolve(key_id, request_id)
                record = await self.path.meter.request_record(key_id, request_id)
            except FalgateError as exc:  # Redis or fal briefly away: the resolver backs us up
                log.info("following %s: %s", request_id, exc.message)
                continue
            except Exception:
                log.exception("stopped following %s (the resolver settles it)", request_id)
                return
            if record is None or record.resolved:
                return

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def submit(
    job: service.Job,
    key: ApiKey,
    request_id: str,
    path: service.MoneyPath,
    records: QueueRecords,
    follower: QueueFollower,
) -> service.Submitted:
    """Admit ``job`` and put it in fal's queue through the money path
    (:func:`app.generation.service.submit`), which hands its hold to the resolver; returns at
    once. The job is then followed until it is settled or released."""
    submitted = await service.submit(job, key, request_id, path)
    # The hold is the resolver's now; if this record cannot be written the client gets a 503
    # and the job is billed all the same (its request record says how it ended).
    await records.create(key.id, request_id, job.call.endpoint, submitted.upstream_request_id)
    follower.follow(key.id, request_id)
    return submitted


# --- response bodies ----------------------------------------------------------------------------


def invalid_query(name: str, msg: str) -> InvalidRequest:
    detail = [{"loc": ["query", name], "msg": msg, "type": "value_error"}]
    return InvalidRequest(
        f"Invalid value for '{name}': {msg}", param=name, extra={"detail": detail}
    )


def output_body(outcome: service.Outcome) -> dict[str, Any]:
    """The model's output as fal returned it (rebuilt in fal's shape from the settled images
    only if fal's own body is not at hand)."""
    if outcome.result is not None and outcome.result.body:
        return outcome.result.body
    return _fal_shaped(outcome.job.operation, outcome.images, outcome.seed, outcome.job.prompt)


def replayed_output(record: RequestRecord) -> dict[str, Any]:
    """A completed request's output in fal's shape, rebuilt from the money path's record."""
    return _fal_shaped(record.operation, record.images or [], record.seed, record.prompt)


def _fal_shaped(
    operation: str, images: list[GeneratedImage], seed: int | None, prompt: str | None
) -> dict[str, Any]:
    shaped = [
        {"url": i.url, "width": i.width, "height": i.height, "content_type": i.content_type}
        for i in images
    ]
    if operation == service.UPSCALE:
        return {"image": shaped[0] if shaped else None}
    return {"images": shaped, "seed": seed, "prompt": prompt}


def links(base_url: str, endpoint: str, request_id: str) -> dict[str, str]:
    """The queue URLs of a request on falgate (fal's status/result/cancel drop the sub-path)."""
    url = f"{base_url}/fal/queue/{owner_app(endpoint)}/requests/{request_id}"
    return {
        "request_id": request_id,
        "response_url": url,
        "status_url": url + "/status",
        "cancel_url": url + "/cancel",
    }


def status_body(record: QueueRecord, base_url: str, with_logs: bool) -> tuple[int, dict[str, Any]]:
    """202 until the money path resolved the job, then 200 COMPLETED (a failed or cancelled
    request is COMPLETED too, with ``error``); ``logs`` is always present, as the Python
    client requires."""
    body: dict[str, Any] = {
        **links(base_url, record.endpoint, record.request_id),
        "logs": [] if with_logs else None,
    }
    if not record.final:
        body["status"] = "IN_PROGRESS"
        return 202, body
    body.update(status="COMPLETED", metrics={})
    if record.status != "completed":
        body["error"] = f"The request {record.status} without a result."
        body["error_type"] = record.status
    return 200, body


async def result_body(record: QueueRecord, fal: FalClient) -> tuple[int, dict[str, Any]]:
    """The model's output as fal returned it (rebuilt from the settled images if fal no longer
    has it), or the error the request ended with."""
    if not record.final:
        return 400, {"detail": "Request is still in progress", "error_type": "in_progress"}
    assert record.money is not None
    if record.status != "completed":
        detail = f"The request {record.status} without a result."
        return 422, {"detail": detail, "error_type": record.status}
    try:
        outcome = await fal.outcome(record.endpoint, record.fal_request_id)
    except FalgateError:
        outcome = None
    if outcome is not None and outcome.result is not None and outcome.result.body:
        return 200, outcome.result.body
    return 200, replayed_output(record.money)


_CANCEL_CODES = {"OK": 200, "CANCELLATION_REQUESTED": 202, "ALREADY_COMPLETED": 400}


async def cancel(
    record: QueueRecord, key_id: str, fal: FalClient, follower: QueueFollower
) -> tuple[int, str]:
    """Ask fal to cancel. The hold is then released or settled from fal's answer by the
    resolver (released if fal cancelled it without output, settled if it completed)."""
    if record.final:
        return 400, "ALREADY_COMPLETED"
    answer = await fal.cancel(record.endpoint, record.fal_request_id)
    await follower.resolve(key_id, record.request_id)
    return _CANCEL_CODES.get(answer, 404), answer
