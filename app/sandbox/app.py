"""The fal emulator as a FastAPI app: fal's sync and queue protocols plus a control API.

Routes (fal-protocol.md section 1):

- ``POST /{model_id}``                                        sync run
- ``POST /queue/{model_id}``                                  queue submit
- ``GET  /queue/{owner}/{app}/requests/{id}/status[?logs=1]`` 202 pending, 200 completed
- ``GET  /queue/{owner}/{app}/requests/{id}``                 result
- ``PUT  /queue/{owner}/{app}/requests/{id}/cancel``          cancel
- ``GET  /files/{name}``                                      generated images (fal's CDN)
- ``/_sandbox/...``                                           control API and request ledger
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import urllib.request
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.types import Receive, Scope, Send

from app.errors import FalgateError
from app.images.image import probe_image
from app.sandbox.config import FaultRule, FaultScope, SandboxConfig
from app.sandbox.connections import close_connection
from app.sandbox.endpoints import (
    ENDPOINTS,
    ModelError,
    OutputFile,
    SourceImage,
    field_error,
)
from app.sandbox.render import (
    CONTENT_TYPES,
    EXTENSIONS,
    SMALL_PICTURE_PIXELS,
    FileStore,
    render_image,
    render_small,
)
from app.sandbox.state import FalResponse, Job, SandboxState, app_path, fal_error, fault_response

_MAX_SOURCE_BYTES = 64 * 1024 * 1024
_LOGS_VALUES = {"1": True, "true": True, "0": False, "false": False}
_STREAM_KEEPALIVE_S = 15.0  # fal sends a comment line after this long without news
# What the result of a cancelled request answers (a failed request's result is its error).
_CANCELLED = FalResponse(
    400, {"detail": "Request was cancelled", "error_type": "request_cancelled"}
)


class DropConnection(Response):
    """Closes the client's connection without a byte of response (the ``drop`` fault)."""

    def __init__(self) -> None:
        super().__init__(status_code=204)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if close_connection(scope):
            # Wait until the server has noticed, or it would answer 500 in our place.
            while (await receive())["type"] != "http.disconnect":
                pass
            return
        # Served by a server without our protocol: start a response and abandon it, which
        # makes the server close the connection mid-response.
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"1")]}
        )


def _json(response: FalResponse, request_id: str | None = None) -> JSONResponse:
    headers = dict(response.headers)
    if request_id is not None:
        headers["x-fal-request-id"] = request_id
    return JSONResponse(response.body, status_code=response.status_code, headers=headers)


def _not_found(detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=404)


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _validation_detail(exc: ValidationError) -> list[dict[str, Any]]:
    return [
        {"loc": ["body", *err["loc"]], "msg": err["msg"], "type": err["type"]}
        for err in exc.errors(include_url=False, include_context=False, include_input=False)
    ]


class Sandbox:
    """Request handling, with the state and resources of one app instance."""

    def __init__(self, config: SandboxConfig, files_dir: Path | None = None) -> None:
        self.state = SandboxState(config)
        self.files = FileStore(config.max_file_bytes, files_dir)
        self.http: httpx.AsyncClient | None = None

    # --- life cycle --------------------------------------------------------
    async def start(self) -> None:
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(10.0), follow_redirects=True)

    async def stop(self) -> None:
        await self.cancel_all()
        if self.http is not None:
            await self.http.aclose()

    async def cancel_all(self) -> None:
        tasks = [j.task for j in self.state.jobs.values() if j.task and not j.task.done()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with suppress(asyncio.CancelledError):
                await task

    async def reset(self) -> None:
        await self.cancel_all()
        self.state.clear()
        self.state.config = self.state.initial.model_copy(deep=True)
        self.files.clear()
        self.files.max_bytes = self.state.config.max_file_bytes
        self.state.wake_slot_waiters()

    def update_config(self, changes: dict[str, Any]) -> SandboxConfig:
        merged = self.state.config.model_dump() | changes
        self.state.config = SandboxConfig.model_validate(merged)
        self.files.max_bytes = self.state.config.max_file_bytes
        self.state.wake_slot_waiters()
        return self.state.config

    # --- guards shared by the model routes ---------------------------------
    async def guard(
        self, request: Request, scope: FaultScope, endpoint: str | None
    ) -> Response | None:
        """An injected fault or a missing key answers instead of the route; else None."""
        rule = self.state.take_fault(scope, endpoint)
        if rule is not None:
            answer = await self._apply_fault(rule, request)
            if answer is not None:
                return answer
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() not in ("key", "bearer") or not credentials.strip():
            return JSONResponse(
                {"detail": "Missing or invalid Authorization header. Expected 'Key <key>'."},
                status_code=401,
            )
        return None

    async def _apply_fault(self, rule: FaultRule, request: Request) -> Response | None:
        if rule.kind == "drop":
            return DropConnection()
        if rule.kind == "hang":
            await _wait_disconnect(request)
            return Response(status_code=204)
        if rule.kind in ("delay", "timeout"):
            await asyncio.sleep(rule.delay_ms / 1000)
            if rule.kind == "delay":
                return None
        return _json(fault_response(rule))

    # --- model input -------------------------------------------------------
    async def parse(self, request: Request, endpoint: str) -> Any:
        """The validated model input, or a ``JSONResponse`` with fal's 422."""
        try:
            payload = json.loads(await request.body())
        except ValueError:
            detail = [{"loc": ["body"], "msg": "Invalid JSON body", "type": "json_invalid"}]
            return JSONResponse({"detail": detail}, status_code=422)
        try:
            return ENDPOINTS[endpoint].validate(payload)
        except ValidationError as exc:
            return JSONResponse({"detail": _validation_detail(exc)}, status_code=422)

    def new_job(self, request: Request, endpoint: str, protocol: str, arguments: Any) -> Job:
        start_timeout: float | None = None
        raw = request.headers.get("x-fal-request-timeout")
        if raw:
            with suppress(ValueError):
                start_timeout = float(raw)
        job = self.state.new_job(
            endpoint=endpoint,
            protocol="sync" if protocol == "sync" else "queue",
            arguments=arguments,
            base_url=(self.state.config.public_url or str(request.base_url)).rstrip("/"),
            start_timeout_s=start_timeout,
        )
        job.task = asyncio.create_task(self.process(job), name=f"sandbox-{job.request_id}")
        return job

    def cancel_job(self, job: Job) -> None:
        """Stop a request now: it is COMPLETED (cancelled) whether or not its task ran yet."""
        job.cancel_requested = True
        self.state.finish(job, "cancelled", _CANCELLED)
        if job.task is not None:
            job.task.cancel()

    # --- the work ----------------------------------------------------------
    async def process(self, job: Job) -> None:
        """Queue wait, generation and completion of one request, whatever its protocol."""
        try:
            job.log("Request queued.")
            if not await self._start(job):
                timeout = fal_error(504)
                timeout.headers["X-Fal-Request-Timeout-Type"] = "user"
                self.state.finish(job, "failed", timeout)
                return
            try:
                await self._work(job)
            finally:
                self.state.release_slot()
        except ModelError as exc:
            self.state.finish(job, "failed", FalResponse(exc.status_code, {"detail": exc.detail}))
        except asyncio.CancelledError:
            self.state.finish(job, "cancelled", _CANCELLED)
            if not job.cancel_requested:
                raise

    async def _start(self, job: Job) -> bool:
        """Wait in fal's queue for a slot; False if the start deadline passed first."""
        loop = asyncio.get_running_loop()
        deadline = None if job.start_timeout_s is None else loop.time() + job.start_timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                if self.state.config.queue_ms:
                    await asyncio.sleep(self.state.config.queue_ms / 1000)
                await self.state.acquire_slot()
        except TimeoutError:
            return False
        self.state.start(job)
        return True

    async def _work(self, job: Job) -> None:
        loop = asyncio.get_running_loop()
        began = loop.time()
        endpoint = ENDPOINTS[job.endpoint]
        rule = job.fault
        if rule is not None:
            job.log(f"Sandbox fault: {rule.kind}.", "WARN")
            if rule.kind == "hang":
                await loop.create_future()
            if rule.kind in ("delay", "timeout"):
                await asyncio.sleep(rule.delay_ms / 1000)
            if rule.kind != "delay":
                self.state.finish(job, "failed", fault_response(rule))
                return
        plan = await endpoint.plan(job.arguments, self.load_image)
        limit = self.state.config.max_output_pixels
        if any(w * h > limit for w, h in plan.sizes):
            raise field_error("image_size", f"Output images are limited to {limit} pixels.")
        job.seed = plan.seed
        job.log(f"Generating {len(plan.sizes)} image(s).")
        await asyncio.sleep(self.state.config.latency_ms / 1000)
        files = []
        for index, (width, height) in enumerate(plan.sizes):
            small = width * height <= SMALL_PICTURE_PIXELS
            draw = functools.partial(
                render_small if small else render_image,
                seed=plan.seed,
                prompt=plan.prompt,
                index=index,
                width=width,
                height=height,
                image_format=plan.image_format,
            )
            # A small picture is remembered (a new one takes about a millisecond): drawn here.
            data = draw() if small else await asyncio.to_thread(draw)
            files.append(self._store(job, data, width, height, plan.image_format, plan.sync_mode))
        job.files = files
        job.inference_s = round(loop.time() - began, 3)
        body = endpoint.respond(plan, files, job.inference_s)
        self.state.finish(job, "completed", FalResponse(200, body))

    def _store(
        self, job: Job, data: bytes, width: int, height: int, image_format: str, inline: bool
    ) -> OutputFile:
        content_type = CONTENT_TYPES[image_format]
        name = f"{uuid.uuid4().hex}.{EXTENSIONS[image_format]}"
        if inline:
            # sync_mode: fal answers with the media inline instead of a CDN URL.
            url = f"data:{content_type};base64,{base64.b64encode(data).decode('ascii')}"
        else:
            self.files.put(name, data, content_type)
            url = f"{job.base_url}/files/{name}"
        return OutputFile(url, name, content_type, len(data), width, height)

    async def load_image(self, url: str) -> SourceImage:
        """An ``image_url`` input: a data: URI, one of our own files, or any http(s) URL."""
        try:
            data = await self._fetch_source(url)
            probed = probe_image(data, max_pixels=self.state.config.max_output_pixels)
        except FalgateError as exc:
            raise field_error("image_url", exc.message, "image_load_error") from exc
        return SourceImage(probed.data, probed.width, probed.height)

    async def _fetch_source(self, url: str) -> bytes:
        if url[:5].lower() == "data:":
            try:
                with urllib.request.DataHandler().data_open(urllib.request.Request(url)) as r:
                    data: bytes = r.read()
            except ValueError as exc:
                raise field_error("image_url", "Invalid data URI", "image_load_error") from exc
            return data
        parsed = httpx.URL(url)
        own = self.files.get(parsed.path.removeprefix("/files/"))
        if parsed.path.startswith("/files/") and own is not None:
            return own.data
        if parsed.scheme not in ("http", "https") or self.http is None:
            raise field_error("image_url", "Unsupported URL scheme", "image_load_error")
        try:
            async with self.http.stream("GET", url) as response:
                if response.status_code != 200:
                    raise field_error(
                        "image_url",
                        f"Failed to download the image: HTTP {response.status_code}",
                        "image_load_error",
                    )
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > _MAX_SOURCE_BYTES:
                        raise field_error("image_url", "Image too large", "image_load_error")
                return bytes(body)
        except httpx.HTTPError as exc:
            raise field_error(
                "image_url", "Failed to download the image", "image_load_error"
            ) from exc

    # --- queue views -------------------------------------------------------
    def find(self, owner_app: str, request_id: str) -> Job | None:
        job = self.state.jobs.get(request_id)
        if job is None or app_path(job.endpoint) != owner_app:
            return None
        return job

    async def status_events(self, job: Job, with_logs: bool) -> AsyncIterator[bytes]:
        """fal's status stream: an SSE event per status change (the current one first), a
        comment line every 15 s of quiet, and the end of the stream after COMPLETED."""
        last: tuple[str, int | None] | None = None
        while True:
            body = self.status_body(job, with_logs)
            seen = (str(body["status"]), body.get("queue_position"))
            if seen != last:
                last = seen
                yield self.status_event(body)
            if job.state == "COMPLETED":
                return
            if not await job.wait_change(_STREAM_KEEPALIVE_S):
                yield b": keep-alive\n\n"

    @staticmethod
    def status_event(body: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    def status_body(self, job: Job, with_logs: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "status": job.state,
            "request_id": job.request_id,
            "response_url": job.request_url,
            "status_url": job.request_url + "/status",
            "cancel_url": job.request_url + "/cancel",
            "logs": list(job.logs) if with_logs else None,
        }
        if job.state == "IN_QUEUE":
            body["queue_position"] = self.state.queue_position(job)
        if job.state == "COMPLETED":
            body["metrics"] = {"inference_time": job.inference_s}
            if job.outcome != "completed" and job.response is not None:
                detail = job.response.body.get("detail")
                body["error"] = detail if isinstance(detail, str) else json.dumps(detail)
                body["error_type"] = job.response.body.get("error_type")
        return body


def create_sandbox_app(
    config: SandboxConfig | None = None, *, files_dir: Path | None = None
) -> FastAPI:
    """A fal emulator (sync run at the root, queue under ``/queue``) with a control API.

    ``config`` sets latency, queue behaviour and faults; all of it can be changed at runtime
    with ``PUT /_sandbox/config`` and restored with ``POST /_sandbox/reset``. With
    ``files_dir`` generated files are kept there (and survive a restart) instead of in memory.
    """
    sandbox = Sandbox(config or SandboxConfig(), files_dir)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await sandbox.start()
        try:
            yield
        finally:
            await sandbox.stop()

    app = FastAPI(
        title="falgate fal sandbox",
        description="An emulator of fal.ai's HTTP API for development and tests.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.sandbox = sandbox

    # --- control API (registered first: the model routes catch every path) ---
    @app.get("/_sandbox/config")
    async def get_config() -> dict[str, Any]:
        return sandbox.state.config.model_dump()

    @app.put("/_sandbox/config")
    async def put_config(request: Request) -> Response:
        try:
            changes = await request.json()
            if not isinstance(changes, dict):
                raise ValueError("expected a JSON object")
            config = sandbox.update_config(changes)
        except ValidationError as exc:
            return JSONResponse({"detail": _validation_detail(exc)}, status_code=422)
        except ValueError as exc:
            return JSONResponse({"detail": str(exc)}, status_code=422)
        return JSONResponse(config.model_dump())

    @app.post("/_sandbox/faults")
    async def add_fault(rule: FaultRule) -> dict[str, Any]:
        sandbox.state.config.faults.append(rule)
        return sandbox.state.config.model_dump()

    @app.delete("/_sandbox/faults")
    async def clear_faults() -> dict[str, Any]:
        sandbox.state.config.faults.clear()
        return sandbox.state.config.model_dump()

    @app.post("/_sandbox/reset")
    async def reset() -> dict[str, Any]:
        await sandbox.reset()
        return sandbox.state.config.model_dump()

    @app.get("/_sandbox/requests")
    async def ledger(status: str | None = None, endpoint: str | None = None) -> dict[str, Any]:
        entries = [job.ledger_entry() for job in sandbox.state.jobs.values()]
        entries = [
            e
            for e in entries
            if (status is None or e["status"] == status)
            and (endpoint is None or e["endpoint"] == endpoint)
        ]
        return {"requests": entries}

    @app.get("/_sandbox/requests/{request_id}")
    async def ledger_entry(request_id: str) -> Response:
        job = sandbox.state.jobs.get(request_id)
        if job is None:
            return _not_found("Request not found")
        return JSONResponse(job.ledger_entry())

    @app.get("/files/{name}")
    async def file(name: str) -> Response:
        stored = sandbox.files.get(name)
        if stored is None:
            return _not_found("File not found")
        return Response(stored.data, media_type=stored.content_type)

    # --- fal's queue ---------------------------------------------------------
    async def status_of(
        owner_app: str, request_id: str, request: Request
    ) -> tuple[Job, bool] | Response:
        """The job a status call asks about and whether it wants the logs, or the answer
        (an injected fault, 422 for a bad ``logs``, 404)."""
        job = sandbox.find(owner_app, request_id)
        blocked = await sandbox.guard(request, "status", job.endpoint if job else None)
        if blocked is not None:
            return blocked
        raw_logs = request.query_params.get("logs", "0").lower()
        if raw_logs not in _LOGS_VALUES:
            detail = [{"loc": ["query", "logs"], "msg": "Invalid boolean", "type": "bool_parsing"}]
            return JSONResponse({"detail": detail}, status_code=422)
        if job is None:
            return _not_found("Request not found")
        return job, _LOGS_VALUES[raw_logs]

    @app.get("/queue/{owner_app:path}/requests/{request_id}/status/stream")
    async def status_stream(owner_app: str, request_id: str, request: Request) -> Response:
        asked = await status_of(owner_app, request_id, request)
        if isinstance(asked, Response):
            return asked
        job, with_logs = asked
        headers = {"x-fal-request-id": job.request_id, "cache-control": "no-cache"}
        if job.state == "COMPLETED":
            # The whole stream is its one last event: sent as one body, without the streaming
            # machinery (a task group per response).
            event = sandbox.status_event(sandbox.status_body(job, with_logs))
            return Response(event, media_type="text/event-stream", headers=headers)
        return StreamingResponse(
            sandbox.status_events(job, with_logs),
            media_type="text/event-stream",
            headers=headers,
        )

    @app.get("/queue/{owner_app:path}/requests/{request_id}/status")
    async def status(owner_app: str, request_id: str, request: Request) -> Response:
        asked = await status_of(owner_app, request_id, request)
        if isinstance(asked, Response):
            return asked
        job, with_logs = asked
        body = sandbox.status_body(job, with_logs)
        code = 200 if job.state == "COMPLETED" else 202
        return JSONResponse(body, status_code=code, headers={"x-fal-request-id": job.request_id})

    @app.get("/queue/{owner_app:path}/requests/{request_id}")
    async def result(owner_app: str, request_id: str, request: Request) -> Response:
        job = sandbox.find(owner_app, request_id)
        blocked = await sandbox.guard(request, "result", job.endpoint if job else None)
        if blocked is not None:
            return blocked
        if job is None:
            return _not_found("Request not found")
        if job.response is None:
            return JSONResponse(
                {"detail": "Request is still in progress"},
                status_code=400,
                headers={"x-fal-request-id": job.request_id},
            )
        return _json(job.response, job.request_id)

    @app.put("/queue/{owner_app:path}/requests/{request_id}/cancel")
    async def cancel(owner_app: str, request_id: str, request: Request) -> Response:
        job = sandbox.find(owner_app, request_id)
        blocked = await sandbox.guard(request, "cancel", job.endpoint if job else None)
        if blocked is not None:
            return blocked
        if job is None:
            return JSONResponse({"status": "NOT_FOUND"}, status_code=404)
        if job.state == "COMPLETED":
            return JSONResponse({"status": "ALREADY_COMPLETED"}, status_code=400)
        was_queued = job.state == "IN_QUEUE"
        sandbox.cancel_job(job)
        if was_queued:
            return JSONResponse({"status": "OK"}, status_code=200)
        return JSONResponse({"status": "CANCELLATION_REQUESTED"}, status_code=202)

    @app.post("/queue/{endpoint:path}")
    async def submit(endpoint: str, request: Request) -> Response:
        if endpoint not in ENDPOINTS:
            return _not_found(f"Application '{endpoint}' not found")
        blocked = await sandbox.guard(request, "submit", endpoint)
        if blocked is not None:
            return blocked
        arguments = await sandbox.parse(request, endpoint)
        if isinstance(arguments, Response):
            return arguments
        job = sandbox.new_job(request, endpoint, "queue", arguments)
        body = {
            "status": "IN_QUEUE",
            "request_id": job.request_id,
            "response_url": job.request_url,
            "status_url": job.request_url + "/status",
            "cancel_url": job.request_url + "/cancel",
            "queue_position": sandbox.state.queue_position(job),
        }
        return JSONResponse(body, headers={"x-fal-request-id": job.request_id})

    # --- fal's sync run ------------------------------------------------------
    @app.post("/{endpoint:path}")
    async def run(endpoint: str, request: Request) -> Response:
        if endpoint not in ENDPOINTS:
            return _not_found(f"Application '{endpoint}' not found")
        blocked = await sandbox.guard(request, "run", endpoint)
        if blocked is not None:
            return blocked
        arguments = await sandbox.parse(request, endpoint)
        if isinstance(arguments, Response):
            return arguments
        job = sandbox.new_job(request, endpoint, "sync", arguments)
        assert job.task is not None
        watcher = asyncio.create_task(_wait_disconnect(request))
        try:
            await asyncio.wait({job.task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if not job.task.done():
            # fal cancels a direct request when its caller drops the connection.
            sandbox.cancel_job(job)
            with suppress(asyncio.CancelledError):
                await job.task
            return Response(status_code=204)
        # No response only if the task was cancelled (a reset) before it ever ran.
        return _json(job.response or _CANCELLED, job.request_id)

    return app
