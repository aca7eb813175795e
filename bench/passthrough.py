"""The benchmark's baseline: a bare pass-through proxy on the gateway's own server stack.

FastAPI on uvicorn (same event loop and HTTP parser as ``falgate serve``), the gateway's fal
client's HTTP client (``upstream_http``: httpx requests straight through the transport, or
httpx's client without a cookie jar when the environment names a proxy) on the same pooled
transport (``--transport``, default ``aiohttp``: ``app/upstream/transport.py``), and one route:
``POST /v1/run/{model_id}``, in one of two modes (``--mode``):

- ``sync`` (default): forwards the body unchanged to the upstream's sync route
  ``POST {upstream}/{model_id}`` and returns fal's answer as it is;
- ``queue``: fal's queue protocol, as the gateway's ``FALGATE_UPSTREAM_MODE=queue`` follows
  it: submits the body unchanged to ``POST {upstream}/queue/{model_id}``, follows the status
  stream (``GET {status_url}/stream``, server-sent events) until it ends after ``COMPLETED``,
  then fetches the result (``GET {response_url}``, the URLs the submit answered, as fal's
  clients use them) and returns it as it is. The baseline for ``gateway-queue``: three
  upstream calls per request, so that what is left over is falgate's own work.

No authentication, validation, pricing, metering, rate limiting, metrics or logging: what is
left is the cost of *any* Python proxy built like falgate, so "gateway / pass-through" isolates
what falgate itself adds.

Run: ``python bench/passthrough.py --port 8200 --upstream http://127.0.0.1:8100 [--mode queue]``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import uvicorn
from fastapi import FastAPI, Request, Response

from app.ops.runtime import fastapi_telemetry, settled, unsettled
from app.upstream.transport import AiohttpTransport, UpstreamHTTP, upstream_http

MODES = ("sync", "queue")
_JSON = {"Content-Type": "application/json"}
_SSE = {"Accept": "text/event-stream"}


def create_passthrough_app(
    upstream: str, *, max_connections: int = 200, transport: str = "aiohttp", mode: str = "sync"
) -> FastAPI:
    """The pass-through app; ``upstream`` is fal's base URL (sync routes at its root, the queue
    under ``/queue``); ``mode`` is ``sync`` (one call) or ``queue`` (submit, stream, result)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The same client shape as the gateway's fal client: one pool, a fal-style key.
        limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections // 2
        )
        # The gateway's upstream client (app/upstream/transport.py: httpx requests sent
        # straight through the transport unless the environment names a proxy).
        client = upstream_http(
            AiohttpTransport(limits=limits) if transport == "aiohttp" else None,
            headers={"Authorization": "Key sandbox", "User-Agent": "passthrough"},
            timeout=httpx.Timeout(60.0, connect=5.0),
            limits=limits,
        )
        app.state.client = client
        # The gateway's own process settings (app/ops/runtime.py), so that what is left over
        # in "own CPU" is falgate's work and not a difference in process tuning.
        thresholds = settled()
        try:
            yield
        finally:
            unsettled(thresholds)
            await client.aclose()

    app = FastAPI(
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        **fastapi_telemetry(),  # as the gateway's
    )

    base = upstream.rstrip("/")

    async def run(model_id: str, request: Request) -> Response:
        client: UpstreamHTTP = request.app.state.client
        upstream_response = await client.request(
            "POST", f"{base}/{model_id}", content=await request.body(), headers=_JSON
        )
        return _as_is(upstream_response)

    async def run_queued(model_id: str, request: Request) -> Response:
        client: UpstreamHTTP = request.app.state.client
        submitted = await client.request(
            "POST", f"{base}/queue/{model_id}", content=await request.body(), headers=_JSON
        )
        if not 200 <= submitted.status_code < 300:
            return _as_is(submitted)
        job = submitted.json()
        # fal's stream sends an event per status change and ends after COMPLETED; it is read
        # to its end, as the gateway reads it.
        events = await client.request("GET", job["status_url"] + "/stream", headers=_SSE)
        if events.status_code != 200:
            return _as_is(events)
        status = None
        for line in events.text.splitlines():
            if line.startswith("data:"):
                status = json.loads(line[5:]).get("status")
        if status != "COMPLETED":
            return Response(
                json.dumps({"detail": f"status stream ended at {status}"}),
                status_code=502,
                media_type="application/json",
            )
        return _as_is(await client.request("GET", job["response_url"]))

    app.add_api_route(
        "/v1/run/{model_id:path}", run if mode == "sync" else run_queued, methods=["POST"]
    )
    return app


def _as_is(upstream_response: httpx.Response) -> Response:
    """fal's answer, status and body unchanged."""
    return Response(
        upstream_response.content,
        status_code=upstream_response.status_code,
        media_type="application/json",
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="bare pass-through proxy (benchmark baseline)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8200)
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:8100")
    parser.add_argument("--transport", choices=["aiohttp", "httpx"], default="aiohttp")
    parser.add_argument(
        "--mode",
        choices=MODES,
        default="sync",
        help="sync: one POST to fal's sync route; queue: submit, status stream, result",
    )
    args = parser.parse_args(argv)
    uvicorn.run(
        create_passthrough_app(args.upstream, transport=args.transport, mode=args.mode),
        host=args.host,
        port=args.port,
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
