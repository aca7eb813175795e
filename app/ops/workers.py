"""``falgate serve --workers N`` (``FALGATE_WORKERS``): N server processes on one port.

The parent process owns everything there must be one of: it starts the embedded Redis and the
embedded sandbox (when they are not configured), creates the development key and prints the
banner, clears the Prometheus multiprocess directory, then runs uvicorn's process supervisor.
Each worker is a plain ``create_app()`` whose settings come from the environment the parent
prepared: ``FALGATE_REDIS_URL`` and ``FALGATE_SANDBOX_URL`` point at the shared services, so no
worker starts its own. Per-process state stays per process and is correct across them: every
worker's lifespan has its own process id and lease (the sweeper and the meter already work
across processes), and metrics are written with ``prometheus_client``'s multiprocess mode to
``<data dir>/prometheus`` so that ``/metrics`` on any worker reports all of them.

On SIGTERM/SIGINT uvicorn stops the workers (each drains its in-flight requests), then the
parent stops the sandbox and the embedded Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import threading
from typing import TYPE_CHECKING, Any

from app.settings import Settings, get_settings

if TYPE_CHECKING:
    from fastapi import FastAPI

    from app.ops.metrics import Metrics

log = logging.getLogger("falgate")

#: Set in every worker's environment (to the parent's pid): the parent already did the
#: once-per-deployment work (development key, banner).
WORKER_ENV = "FALGATE_WORKER_OF"
#: prometheus_client reads this when it is imported; the workers are spawned with it set.
PROMETHEUS_ENV = "PROMETHEUS_MULTIPROC_DIR"


def is_worker() -> bool:
    """True in a worker process started by :func:`serve_workers`."""
    return bool(os.environ.get(WORKER_ENV))


# --- inside each worker: the app, and the edge protocol reporting to its metrics ---------
_edge_metrics: Metrics | None = None


def worker_app() -> FastAPI:
    """The app factory uvicorn calls in each worker (settings from the parent's environment)."""
    global _edge_metrics
    from app.main import create_app
    from app.ops.metrics import metrics_of

    app = create_app()
    _edge_metrics = metrics_of(app)
    return app


def _record_edge_close(reason: str) -> None:
    if _edge_metrics is not None:
        _edge_metrics.record_edge_close(reason)


def __getattr__(name: str) -> Any:
    """``WorkerEdgeProtocol``: the edge's HTTP protocol (header timeout, connection cap, per
    worker), built in the worker that imports it: uvicorn pickles its config for the spawned
    workers, and a protocol class made at run time cannot be pickled."""
    if name != "WorkerEdgeProtocol":
        raise AttributeError(name)
    from app.ops.edge import edge_protocol

    settings = get_settings()
    protocol = edge_protocol(
        header_timeout_s=settings.header_timeout_s,
        max_connections=settings.max_connections,
        on_close=_record_edge_close,
    )
    globals()[name] = protocol
    return protocol


class _SandboxThread:
    """The embedded sandbox on its own event loop in a thread of the parent process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.url: str | None = None
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="falgate-sandbox", daemon=True)

    def start(self, timeout_s: float = 30.0) -> str:
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise RuntimeError("the embedded sandbox did not start")
        if self.error is not None or self.url is None:
            raise RuntimeError(f"the embedded sandbox did not start: {self.error!r}")
        return self.url

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to the starting thread
            self.error = exc
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        from app.sandbox import SandboxConfig, embedded_sandbox

        s = self.settings
        config = SandboxConfig(latency_ms=s.sandbox_latency_ms, public_url=s.sandbox_public_url)
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with embedded_sandbox(s.sandbox_host, s.sandbox_port, config=config) as url:
            self.url = url
            self._ready.set()
            await self._stop.wait()


def prepare_metrics_dir(settings: Settings) -> str:
    """``<data dir>/prometheus``, emptied: a previous run's per-process files must not count."""
    path = settings.data_dir.resolve() / "prometheus"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return str(path)


async def _welcome(settings: Settings, admin_token: str) -> None:
    from app.catalog import load_catalog
    from app.keys.service import KeyService, model_names
    from app.main import sandbox_welcome
    from app.redis import redis_client

    assert settings.redis_url is not None
    catalog = load_catalog(settings.catalog_file)
    redis = redis_client(settings.redis_url, settings)
    try:
        keys = KeyService(redis, known_models=model_names(catalog))
        await sandbox_welcome(settings, keys, admin_token)
    finally:
        await redis.aclose()


def serve_workers(
    settings: Settings, workers: int, admin_token: str, options: dict[str, Any] | None = None
) -> int:
    """Run ``workers`` gateway processes on ``settings.host:settings.port`` until a signal.

    ``options``: uvicorn keyword arguments from ``falgate serve`` (TLS files); the logging ones
    are made again here, once the embedded Redis's password is known (the logs blank it)."""
    import uvicorn

    from app.ops.edge import raise_open_file_limit
    from app.ops.logging import uvicorn_options
    from app.redis import EmbeddedRedis

    data_dir = settings.data_dir.resolve()
    env = {
        "FALGATE_HOST": settings.host,
        "FALGATE_PORT": str(settings.port),
        "FALGATE_DATA_DIR": str(data_dir),
        PROMETHEUS_ENV: prepare_metrics_dir(settings),
        WORKER_ENV: str(os.getpid()),
    }
    with contextlib.ExitStack() as stack:
        if settings.redis_url is None:
            embedded = EmbeddedRedis(data_dir)
            env["FALGATE_REDIS_URL"] = embedded.start()
            stack.callback(embedded.stop)
            log.info("started a private Redis server", extra={"port": embedded.port})
        if settings.sandbox_mode and settings.sandbox_url is None:
            sandbox = _SandboxThread(settings)
            stack.callback(sandbox.stop)
            env["FALGATE_SANDBOX_URL"] = sandbox.start()
        settings = settings.model_copy(
            update={
                "redis_url": env.get("FALGATE_REDIS_URL", settings.redis_url),
                "sandbox_url": env.get("FALGATE_SANDBOX_URL", settings.sandbox_url),
            }
        )
        os.environ.update(env)
        if settings.sandbox_mode:
            asyncio.run(_welcome(settings, admin_token))
        log.info("starting %d worker processes", workers)
        raise_open_file_limit(settings.max_connections + 256)  # inherited by the workers
        keep_alive: dict[str, Any] = {"timeout_keep_alive": settings.keep_alive_timeout_s}
        uvicorn.run(
            "app.ops.workers:worker_app",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=workers,
            http="app.ops.workers:WorkerEdgeProtocol",
            **{**(options or {}), **uvicorn_options(settings), **keep_alive},
        )
    return 0
