"""The benchmark's baseline: a bare pass-through proxy on the gateway's own server stack.

FastAPI on uvicorn (same event loop and HTTP parser as ``falgate serve``), one pooled
``httpx.AsyncClient`` on the same HTTP transport as the gateway's fal client (``--transport``,
default ``aiohttp``: ``app/upstream/transport.py``), and one route:
``POST /v1/run/{model_id}`` forwards the body unchanged to the upstream's sync route
``POST {upstream}/{model_id}`` and returns fal's answer as it is. No authentication,
validation, pricing, metering, rate limiting, metrics or logging: what is left is the cost of
*any* Python proxy built like falgate, so "gateway / pass-through" isolates what falgate itself
adds.

Run: ``python bench/passthrough.py --port 8200 --upstream http://127.0.0.1:8100``.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import uvicorn
from fastapi import FastAPI, Request, Response

from app.upstream.transport import AiohttpTransport


def create_passthrough_app(
    upstream: str, *, max_connections: int = 200, transport: str = "aiohttp"
) -> FastAPI:
    """The pass-through app; ``upstream`` is the base URL of fal's sync protocol."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The same client shape as the gateway's fal client: one pool, a fal-style key.
        limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections // 2
        )
        async with httpx.AsyncClient(
            transport=AiohttpTransport(limits=limits) if transport == "aiohttp" else None,
            base_url=upstream.rstrip("/"),
            headers={"Authorization": "Key sandbox", "User-Agent": "passthrough"},
            timeout=httpx.Timeout(60.0, connect=5.0),
            limits=limits,
        ) as client:
            app.state.client = client
            yield

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.post("/v1/run/{model_id:path}")
    async def run(model_id: str, request: Request) -> Response:
        client: httpx.AsyncClient = request.app.state.client
        upstream_response = await client.post(
            f"/{model_id}",
            content=await request.body(),
            headers={"Content-Type": "application/json"},
        )
        return Response(
            upstream_response.content,
            status_code=upstream_response.status_code,
            media_type="application/json",
        )

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="bare pass-through proxy (benchmark baseline)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8200)
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:8100")
    parser.add_argument("--transport", choices=["aiohttp", "httpx"], default="aiohttp")
    args = parser.parse_args(argv)
    uvicorn.run(
        create_passthrough_app(args.upstream, transport=args.transport),
        host=args.host,
        port=args.port,
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
