"""A small app wired like the gateway (``install_ops``), for the logging and metrics tests.

Run as a script it serves with ``uvicorn_options`` and JSON logging, the way ``falgate serve``
does: ``python tests/ops/ops_demo_app.py PORT``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request

from app.errors import Unavailable, add_exception_handlers
from app.ops.install import install_ops
from app.ops.shutdown import InflightTracker
from app.settings import Settings

FAL_KEY = "fal-secret-1234:abcdef0123456789"
ADMIN_TOKEN = "admin-secret-token-0123456789"
REDIS_PASSWORD = "redis-secret-pw-42"
GATEWAY_KEY = "fgk_Z3RhbGVzZWNyZXRrZXlfZm9yX3Rlc3Rz"

log = logging.getLogger("falgate.demo")


def demo_settings(**overrides: object) -> Settings:
    values: dict[str, object] = {
        "fal_key": FAL_KEY,
        "admin_token": ADMIN_TOKEN,
        "redis_url": f"redis://:{REDIS_PASSWORD}@127.0.0.1:1/0",
        "shutdown_grace_s": 10,
        **overrides,
    }
    return Settings(_env_file=None, **values)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    inflight: InflightTracker = app.state.inflight
    drained = await inflight.drain(app.state.settings.shutdown_grace_s)
    log.info("shutdown", extra={"drained": drained})


def build_app(settings: Settings) -> FastAPI:
    app = FastAPI(lifespan=_lifespan)
    app.state.settings = settings
    add_exception_handlers(app)
    install_ops(app, settings)

    @app.post("/v1/run/{model_id:path}")
    async def run(model_id: str, request: Request) -> dict[str, str]:
        body = await request.json()
        request.state.key_id = "key_demo"
        request.state.model = model_id
        request.state.prompt = body.get("prompt")
        inflight: InflightTracker = request.app.state.inflight
        with inflight.track():
            await asyncio.sleep(float(body.get("sleep", 0)))
            request.state.cost_micro = 11797
            request.state.upstream_request_id = "fal-req-123"
        # Secrets that reach a log call by mistake are still blanked out.
        log.info("forwarded with Key %s for %s", FAL_KEY, request.headers.get("authorization"))
        log.warning("admin token %s, redis password %s", ADMIN_TOKEN, REDIS_PASSWORD)
        return {"status": "done"}

    @app.get("/v1/unavailable")
    async def unavailable() -> None:
        raise Unavailable("Redis is unreachable.")

    @app.get("/v1/broken")
    async def broken() -> None:
        raise RuntimeError(f"boom with {GATEWAY_KEY}")

    return app


def main() -> None:
    import uvicorn

    from app.ops.logging import configure_logging, uvicorn_options

    settings = demo_settings(port=int(sys.argv[1]), log_prompts=len(sys.argv) > 2)
    configure_logging(settings)
    uvicorn.run(
        build_app(settings), host="127.0.0.1", port=settings.port, **uvicorn_options(settings)
    )


if __name__ == "__main__":
    main()
