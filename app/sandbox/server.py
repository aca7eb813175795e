"""Running the sandbox: standalone (blocking) or embedded in the current event loop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Generator
from pathlib import Path

import uvicorn
from starlette.types import ASGIApp

from app.sandbox.app import create_sandbox_app
from app.sandbox.config import SandboxConfig
from app.sandbox.connections import SandboxHTTPProtocol

# Long enough for in-flight answers, short enough that a hanging fault cannot stall shutdown.
_GRACEFUL_SHUTDOWN_S = 2


def _config(config: SandboxConfig | None, latency_ms: int | None) -> SandboxConfig:
    config = config or SandboxConfig()
    if latency_ms is not None:
        config = config.model_copy(update={"latency_ms": latency_ms})
    return config


def run_sandbox(
    host: str = "127.0.0.1",
    port: int = 8100,
    *,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
    ssl_keyfile_password: str | None = None,
    latency_ms: int | None = None,
    config: SandboxConfig | None = None,
    log_level: str = "info",
    access_log: bool = True,
) -> None:
    """Serve the fal emulator until interrupted (``falgate sandbox``). Blocks.

    Sync run is at ``http(s)://host:port/`` and the queue at ``.../queue``; TLS is on when
    ``ssl_certfile``/``ssl_keyfile`` are given (uvicorn's options), which is what the official
    ``fal-client`` needs (``FAL_RUN_HOST``, ``FAL_QUEUE_RUN_HOST``, ``SSL_CERT_FILE``).
    ``latency_ms`` overrides ``config.latency_ms``; when both are absent the
    ``FALGATE_SANDBOX_LATENCY_MS`` setting applies. Port 0 picks a free port (uvicorn logs it).
    """
    if latency_ms is None and config is None:
        from app.settings import Settings

        latency_ms = Settings().sandbox_latency_ms
    uvicorn.run(
        create_sandbox_app(_config(config, latency_ms)),
        host=host,
        port=port,
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
        ssl_keyfile_password=ssl_keyfile_password,
        http=SandboxHTTPProtocol,
        log_level=log_level,
        access_log=access_log,
        timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_S,
    )


class _EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to the process that hosts it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


@contextlib.asynccontextmanager
async def serve_app(
    app: ASGIApp,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
    log_level: str = "warning",
) -> AsyncIterator[str]:
    """Serve any ASGI app with uvicorn in a background task of the running loop.

    Yields the base URL with the real port (``port=0`` picks a free one). The socket is bound
    here, so a busy port raises ``OSError`` instead of exiting the process.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # An explicit IPPROTO_TCP makes asyncio set TCP_NODELAY on accepted connections; without
    # it every response waits ~40 ms on Nagle and delayed ACKs.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen()
    except OSError:
        sock.close()
        raise
    config = uvicorn.Config(
        app,
        log_config=None,  # the hosting process owns logging configuration
        log_level=log_level,
        access_log=False,
        http=SandboxHTTPProtocol,
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
        timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_S,
    )
    server = _EmbeddedServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="embedded-uvicorn")
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("the embedded server stopped during startup")
            await asyncio.sleep(0.01)
        bound_port = sock.getsockname()[1]
        shown_host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        if ":" in shown_host:
            shown_host = f"[{shown_host}]"
        scheme = "https" if ssl_certfile else "http"
        yield f"{scheme}://{shown_host}:{bound_port}"
    finally:
        server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=_GRACEFUL_SHUTDOWN_S + 3)
        except TimeoutError:
            server.force_exit = True
            await task
        finally:
            sock.close()


@contextlib.asynccontextmanager
async def embedded_sandbox(
    host: str = "127.0.0.1",
    port: int = 0,
    latency_ms: int | None = None,
    *,
    config: SandboxConfig | None = None,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
    state_dir: Path | None = None,
) -> AsyncIterator[str]:
    """Run the sandbox inside the current process and event loop; yields its base URL.

    Use ``fal_run_url = base`` and ``fal_queue_url = base + "/queue"``. ``port=0`` picks a
    free port. The server stops (in-flight sandbox requests cancelled) when the block exits.
    With ``state_dir``, generated files are kept in ``state_dir/sandbox-files`` and, for
    ``port=0``, the port of the last run is reused when free: the file URLs handed out before
    a restart keep working after it.
    """
    files_dir = None if state_dir is None else state_dir / "sandbox-files"
    app = create_sandbox_app(_config(config, latency_ms), files_dir=files_dir)
    port_file = None if state_dir is None or port else state_dir / "sandbox.port"
    remembered = _read_port(port_file)

    def serve(on_port: int) -> contextlib.AbstractAsyncContextManager[str]:
        return serve_app(app, host, on_port, ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile)

    async with contextlib.AsyncExitStack() as stack:
        try:
            base_url = await stack.enter_async_context(serve(remembered or port))
        except OSError:  # the last run's port is taken now: any free one
            if not remembered:
                raise
            base_url = await stack.enter_async_context(serve(port))
        if port_file is not None:
            fd = os.open(port_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(base_url.rsplit(":", 1)[1])
        yield base_url


def _read_port(path: Path | None) -> int:
    try:
        return int(path.read_text().strip()) if path is not None else 0
    except (OSError, ValueError):
        return 0
