"""fal's own API on falgate (SPEC section 11): ``/fal/run``, ``/fal/queue`` and ``/fal/proxy``.

The official clients reach these unchanged: Python's ``fal-client`` through ``FAL_RUN_HOST`` /
``FAL_QUEUE_RUN_HOST``, JS's ``@fal-ai/client`` through ``proxyUrl`` (``x-fal-target-url``).
Every error is in fal's shape (``{"detail", "error_type"}``), also for authentication.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from app.deps import CurrentKey
from app.errors import FalgateError, Unavailable, request_id_of, validation_error
from app.falapi import service
from app.falapi.schemas import (
    CancelResponse,
    StatusResponse,
    SubmitResponse,
    fal_error_responses,
)
from app.generation import service as generation
from app.generation.routes import execute_metered, metered_response
from app.keys.service import ApiKey
from app.metering.http import idempotent
from app.metering.meter import RequestRecord
from app.money import format_usd
from app.redis import REDIS_ERRORS
from app.routing import FlatRoute

_LOGS = {"1": True, "true": True, "0": False, "false": False, "": False}
_STREAM_POLL_S = 0.1
_STREAM_KEEPALIVE_S = 15.0


def fal_error_response(request: Request, exc: FalgateError) -> JSONResponse:
    status, body, headers = service.fal_error(exc)
    headers["X-Request-Id"] = request_id_of(request)
    return JSONResponse(body, status_code=status, headers=headers)


class FalRoute(FlatRoute):
    """Routes whose errors (including auth and parameter errors) are rendered in fal's shape;
    planned like the metered routes where their shape allows (``app.routing``)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def fal_shaped(request: Request) -> Response:
            try:
                return await handle(request)
            except FalgateError as exc:
                return fal_error_response(request, exc)
            except RequestValidationError as exc:
                return fal_error_response(request, validation_error(exc))
            except REDIS_ERRORS as exc:
                unavailable = Unavailable(
                    "The gateway's state store is unavailable; try again shortly.",
                    headers={"Retry-After": "1"},
                )
                unavailable.__cause__ = exc
                return fal_error_response(request, unavailable)

        return fal_shaped


router = APIRouter(prefix="/fal", tags=["fal"], route_class=FalRoute)

_ERRORS = fal_error_responses(400, 401, 402, 403, 404, 413, 422, 429, 502, 503, 504)
_LOOKUP_ERRORS = fal_error_responses(401, 404, 422, 503)
_RUN_DOC = {"description": "The model's output, exactly as fal returned it."}
LogsParam = Annotated[
    str | None,
    Query(description="`1`/`true` to include the logs (JS sends 1/0, Python true/false)."),
]
TargetUrl = Annotated[
    str | None,
    Header(alias="x-fal-target-url", description="The fal URL the client meant to call."),
]


def _logs(raw: str | None) -> bool:
    value = (raw or "").lower()
    if value not in _LOGS:
        raise service.invalid_query("logs", "Input should be a valid boolean")
    return _LOGS[value]


def _base_url(request: Request) -> str:
    """Where clients reach falgate: ``FALGATE_PUBLIC_URL`` or the request's scheme and host."""
    public = request.app.state.settings.public_url
    if public:
        return str(public).rstrip("/")
    return f"{request.url.scheme}://{request.url.netloc}"


def _records(request: Request) -> service.QueueRecords:
    state = request.app.state
    records: service.QueueRecords | None = getattr(state, "fal_records", None)
    if records is None:
        ttl_s = state.settings.request_record_ttl_s
        records = state.fal_records = service.QueueRecords(state.redis, state.meter, ttl_s)
    return records


def _follower(request: Request) -> service.QueueFollower:
    follower: service.QueueFollower = request.app.state.fal_follower
    return follower


async def _lookup(request: Request, key: ApiKey, app_path: str, rid: str) -> service.QueueRecord:
    return await _records(request).get(key.id, app_path, rid)


# --- the handlers, shared by the direct routes and the proxy route ---------------------------


async def _plan(
    request: Request, key: ApiKey, model_id: str, query: Mapping[str, str]
) -> generation.Job:
    service.refuse_unsupported(query)
    body = service.parse_input(await request.body())
    state = request.app.state
    return await service.plan(state.catalog, state.settings, key, model_id, body, state.http)


async def _run(request: Request, key: ApiKey, model_id: str, query: Mapping[str, str]) -> Response:
    async def handle() -> Response:
        job = await _plan(request, key, model_id, query)
        outcome = await execute_metered(request, key, job)
        response = metered_response(request, outcome, service.output_body(outcome))
        response.headers["x-fal-request-id"] = request_id_of(request)
        return response

    def replay(record: RequestRecord) -> Response:
        """A retry of a completed run whose response was never stored (``Idempotency-Key``)."""
        body = service.replayed_output(record)
        return JSONResponse(body, headers={"x-fal-request-id": record.request_id})

    return await idempotent(request, key.id, handle, replay)


async def _submit(
    request: Request, key: ApiKey, model_id: str, query: Mapping[str, str]
) -> Response:
    async def handle() -> Response:
        job = await _plan(request, key, model_id, query)
        request.state.model = job.model_id
        rid = request_id_of(request)
        submitted = await service.submit(
            job, key, rid, request.app.state.money, _records(request), _follower(request)
        )
        request.state.upstream_request_id = submitted.upstream_request_id
        links = service.links(_base_url(request), job.call.endpoint, rid)
        body = SubmitResponse(**links, status="IN_QUEUE", queue_position=0)
        admission = submitted.admission
        headers = {"x-fal-request-id": rid, **admission.headers}
        if admission.remaining is not None:
            headers["X-Budget-Remaining-USD"] = format_usd(admission.remaining)
        return JSONResponse(body.model_dump(), headers=headers)

    def replay(record: RequestRecord) -> Response:
        """A retry of a submit whose response was never stored: the same request id."""
        links = service.links(_base_url(request), model_id, record.request_id)
        body = SubmitResponse(**links, status="IN_QUEUE", queue_position=0)
        return JSONResponse(body.model_dump(), headers={"x-fal-request-id": record.request_id})

    return await idempotent(request, key.id, handle, replay)


async def _status_body(
    request: Request, key: ApiKey, app_path: str, rid: str, logs: bool
) -> tuple[int, dict[str, Any]]:
    record = await _lookup(request, key, app_path, rid)
    return service.status_body(record, _base_url(request), logs)


async def _status(
    request: Request, key: ApiKey, app_path: str, rid: str, logs: str | None
) -> Response:
    code, body = await _status_body(request, key, app_path, rid, _logs(logs))
    return JSONResponse(body, status_code=code, headers={"x-fal-request-id": rid})


async def _stream(
    request: Request, key: ApiKey, app_path: str, rid: str, logs: str | None
) -> Response:
    with_logs = _logs(logs)
    _, first = await _status_body(request, key, app_path, rid, with_logs)  # 404 up front

    async def events() -> AsyncIterator[bytes]:
        body, quiet = first, 0.0
        last: str | None = None
        while True:
            text = json.dumps(body)
            if text != last:
                yield f"data: {text}\n\n".encode()
                last, quiet = text, 0.0
            if body["status"] == "COMPLETED":
                return
            await asyncio.sleep(_STREAM_POLL_S)
            quiet += _STREAM_POLL_S
            if quiet >= _STREAM_KEEPALIVE_S:
                yield b": keep-alive\n\n"
                quiet = 0.0
            _, body = await _status_body(request, key, app_path, rid, with_logs)

    headers = {"Cache-Control": "no-cache", "x-fal-request-id": rid}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


async def _result(request: Request, key: ApiKey, app_path: str, rid: str) -> Response:
    record = await _lookup(request, key, app_path, rid)
    code, body = await service.result_body(record, request.app.state.fal)
    return JSONResponse(body, status_code=code, headers={"x-fal-request-id": rid})


async def _cancel(request: Request, key: ApiKey, app_path: str, rid: str) -> Response:
    record = await _lookup(request, key, app_path, rid)
    code, answer = await service.cancel(record, key.id, request.app.state.fal, _follower(request))
    return JSONResponse({"status": answer}, status_code=code, headers={"x-fal-request-id": rid})


# --- fal.run ---------------------------------------------------------------------------------


@router.post(
    "/run/{model_id:path}",
    operation_id="falRun",
    summary="fal's sync run: POST https://fal.run/{model_id}",
    responses={200: _RUN_DOC, **_ERRORS},
)
async def fal_run(request: Request, model_id: str, key: CurrentKey) -> Response:
    return await _run(request, key, model_id, request.query_params)


# --- queue.fal.run ---------------------------------------------------------------------------


@router.get(
    "/queue/{app_path:path}/requests/{request_id}/status/stream",
    operation_id="falQueueStatusStream",
    summary="Server-sent status events until COMPLETED",
    responses={200: {"content": {"text/event-stream": {}}}, **_LOOKUP_ERRORS},
)
async def fal_queue_status_stream(
    request: Request, app_path: str, request_id: str, key: CurrentKey, logs: LogsParam = None
) -> Response:
    return await _stream(request, key, app_path, request_id, logs)


@router.get(
    "/queue/{app_path:path}/requests/{request_id}/status",
    operation_id="falQueueStatus",
    summary="A queue request's status: 202 while pending, 200 when COMPLETED",
    response_model=StatusResponse,
    responses={202: {"model": StatusResponse}, **_LOOKUP_ERRORS},
)
async def fal_queue_status(
    request: Request, app_path: str, request_id: str, key: CurrentKey, logs: LogsParam = None
) -> Response:
    return await _status(request, key, app_path, request_id, logs)


@router.put(
    "/queue/{app_path:path}/requests/{request_id}/cancel",
    operation_id="falQueueCancel",
    summary="Cancel a queue request (fal's answer: OK, CANCELLATION_REQUESTED, ...)",
    response_model=CancelResponse,
    responses=_LOOKUP_ERRORS,
)
async def fal_queue_cancel(
    request: Request, app_path: str, request_id: str, key: CurrentKey
) -> Response:
    return await _cancel(request, key, app_path, request_id)


@router.get(
    "/queue/{app_path:path}/requests/{request_id}",
    operation_id="falQueueResult",
    summary="A queue request's result (the model's output or its error)",
    responses={200: _RUN_DOC, **_LOOKUP_ERRORS},
)
async def fal_queue_result(
    request: Request, app_path: str, request_id: str, key: CurrentKey
) -> Response:
    return await _result(request, key, app_path, request_id)


@router.post(
    "/queue/{model_id:path}",
    operation_id="falQueueSubmit",
    summary="fal's queue submit: POST https://queue.fal.run/{model_id}",
    response_model=SubmitResponse,
    responses=_ERRORS,
)
async def fal_queue_submit(request: Request, model_id: str, key: CurrentKey) -> Response:
    return await _submit(request, key, model_id, request.query_params)


# --- proxy mode ------------------------------------------------------------------------------


_PROXY_SUMMARY = "fal's proxy convention: the fal URL in x-fal-target-url (@fal-ai/server-proxy)"


@router.get("/proxy", operation_id="falProxyGet", summary=_PROXY_SUMMARY, responses=_ERRORS)
@router.put("/proxy", operation_id="falProxyPut", summary=_PROXY_SUMMARY, responses=_ERRORS)
@router.post(
    "/proxy",
    operation_id="falProxyPost",
    summary=_PROXY_SUMMARY,
    responses={200: _RUN_DOC, **_ERRORS},
)
async def fal_proxy(request: Request, key: CurrentKey, target_url: TargetUrl = None) -> Response:
    target = service.proxy_target(target_url, request.method)
    logs = target.query.get("logs")
    if target.kind == "run":
        return await _run(request, key, target.path, target.query)
    if target.kind == "submit":
        return await _submit(request, key, target.path, target.query)
    assert target.request_id is not None
    if target.kind == "status":
        return await _status(request, key, target.path, target.request_id, logs)
    if target.kind == "stream":
        return await _stream(request, key, target.path, target.request_id, logs)
    if target.kind == "result":
        return await _result(request, key, target.path, target.request_id)
    return await _cancel(request, key, target.path, target.request_id)
