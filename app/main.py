"""Process wiring: the app factory and the lifespan that owns every pooled client."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI
from redis.asyncio import Redis

from app import __version__
from app.catalog import load_catalog
from app.catalog.routes import router as catalog_router
from app.dashboard import install_dashboard
from app.errors import Unavailable, add_exception_handlers
from app.falapi.routes import router as fal_router
from app.falapi.service import QueueFollower
from app.generation.routes import router as generation_router
from app.generation.service import MoneyPath
from app.http import BodyLimitMiddleware
from app.keys.invalidation import KeyChangeListener
from app.keys.routes import router as keys_router
from app.keys.schemas import KeyCreate
from app.keys.service import KeyService, model_names
from app.ledger.routes import router as ledger_router
from app.ledger.service import LedgerService
from app.metering import Meter
from app.metering.deferred import DeferredWrites
from app.metering.leases import LeaseKeeper
from app.metering.multiplex import MultiplexedConnection, scripts_client
from app.metering.routes import router as usage_router
from app.metering.sweeper import Sweeper
from app.openapi import contract_document
from app.ops.docs import add_docs
from app.ops.health import router as health_router
from app.ops.logging import RequestContextMiddleware
from app.ops.metrics import mark_process_dead, metrics_of
from app.ops.runtime import fastapi_telemetry, settled, unsettled
from app.ops.shutdown import InflightTracker
from app.ops.workers import is_worker
from app.ratelimit.upstream_gate import UpstreamGate
from app.redis import EmbeddedRedis, private_dir, redis_client
from app.sandbox import SandboxConfig, embedded_sandbox
from app.sapiom.routes import router as sapiom_router
from app.sapiom.service import SapiomService
from app.settings import Settings, get_settings
from app.upstream.client import FalClient

log = logging.getLogger("falgate")

DESCRIPTION = """\
falgate is a metered gateway in front of fal.ai image generation. Every request is validated,
priced per megapixel, held against the calling key's budget, forwarded to fal, and settled to
the real cost. Amounts are decimal strings with six places (micro-dollars)."""


class StartupError(RuntimeError):
    """The configuration cannot be served; the message names the setting to fix."""


def _read_secret_file(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


def _write_secret_file(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(value)


def resolve_admin_token(settings: Settings) -> str:
    """The configured admin token; in sandbox mode one is generated and kept in the data dir."""
    if settings.admin_token is not None and settings.admin_token.get_secret_value():
        token = settings.admin_token.get_secret_value()
        if not settings.sandbox_mode and len(token) < 16:
            raise StartupError("FALGATE_ADMIN_TOKEN must be at least 16 characters.")
        return token
    if not settings.sandbox_mode:
        raise StartupError(
            "A fal key is configured but FALGATE_ADMIN_TOKEN is not set: refusing to start. "
            "Set FALGATE_ADMIN_TOKEN to a long random secret."
        )
    path = settings.data_dir / "admin_token"
    stored = _read_secret_file(path)
    if stored is not None:
        return stored
    generated = "fga_" + secrets.token_urlsafe(32)
    _write_secret_file(path, generated)
    return generated


async def _development_key(settings: Settings, keys: KeyService) -> str:
    """A ready-to-use key for sandbox mode, kept in the data dir and recreated if gone."""
    path = settings.data_dir / "dev_key"
    plaintext = _read_secret_file(path)
    if plaintext is not None:
        with contextlib.suppress(Exception):
            await keys.authenticate(plaintext)
            return plaintext
    _, plaintext = await keys.create(KeyCreate(name="development"))
    _write_secret_file(path, plaintext)
    return plaintext


def _banner(lines: list[str]) -> None:
    """Printed to stderr, not logged: the log scrubber would (rightly) blank the dev key, and
    stdout carries one JSON object per line."""
    rule = "=" * 76
    print("\n".join(["", rule, *(f"  {line}" for line in lines), rule, ""]), file=sys.stderr)


async def sandbox_welcome(settings: Settings, keys: KeyService, admin_token: str) -> None:
    """Sandbox mode: make sure the development key exists and print how to use it."""
    dev_key = await _development_key(settings, keys)
    token_generated = not (
        settings.admin_token is not None and settings.admin_token.get_secret_value()
    )
    scheme = "https" if settings.tls_self_signed or settings.tls_certfile else "http"
    _banner(
        [
            "falgate is running in SANDBOX MODE (no fal key): images come from the",
            "built-in fal emulator and cost nothing real.",
            f"Gateway:       {scheme}://{settings.host}:{settings.port}",
            f"Dashboard:     {scheme}://{settings.host}:{settings.port}/dashboard",
            f"Admin token:   {admin_token}"
            if token_generated
            else "Admin token:   (FALGATE_ADMIN_TOKEN)",
            f"API key (dev): {dev_key}",
            "Try:",
            f"  curl {scheme}://{settings.host}:{settings.port}/v1/generate \\",
            f"    -H 'Authorization: Bearer {dev_key}' \\",
            "    -H 'Content-Type: application/json' -d '{\"prompt\": \"a red fox\"}'",
        ]
    )


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:

    settings: Settings = app.state.settings
    private_dir(settings.data_dir)
    async with contextlib.AsyncExitStack() as stack:
        app.state.admin_token = resolve_admin_token(settings)
        app.state.inflight = InflightTracker()
        app.state.catalog = load_catalog(settings.catalog_file)

        if settings.redis_url is not None:
            redis_url = settings.redis_url
        else:
            embedded = EmbeddedRedis(settings.data_dir)
            redis_url = embedded.start()
            stack.callback(embedded.stop)
            log.info("started a private Redis server", extra={"port": embedded.port})
        redis = redis_client(redis_url, settings)
        stack.push_async_callback(redis.aclose)
        app.state.redis = redis

        upstream = settings
        if settings.sandbox_mode:
            if settings.sandbox_url is not None:
                base = settings.sandbox_url
            else:
                config = SandboxConfig(
                    latency_ms=settings.sandbox_latency_ms,
                    public_url=settings.sandbox_public_url,
                )
                base = await stack.enter_async_context(
                    embedded_sandbox(
                        settings.sandbox_host,
                        settings.sandbox_port,
                        config=config,
                        state_dir=settings.data_dir,  # its files survive a restart
                    )
                )
            base = base.rstrip("/")
            # The sandbox's own file URLs may be fetched, so a generated image can be upscaled;
            # only its file route, not its control routes (/_sandbox/*) or fal's API.
            files = [f"{u.rstrip('/')}/files/" for u in (base, settings.sandbox_public_url) if u]
            settings = settings.model_copy(
                update={
                    "image_fetch_allow_url_prefixes": [
                        *settings.image_fetch_allow_url_prefixes,
                        *files,
                    ]
                }
            )
            app.state.settings = settings
            upstream = settings.model_copy(
                update={"fal_run_url": base, "fal_queue_url": base + "/queue", "fal_key": None}
            )
            log.warning(
                "SANDBOX MODE: no fal key is set, requests go to the built-in fal emulator at %s",
                base,
            )
        app.state.upstream_settings = upstream
        fal = FalClient(upstream)
        await fal.start()
        stack.push_async_callback(fal.aclose)
        app.state.fal = fal
        app.state.http = None

        keys = KeyService(redis, known_models=_known_models(app))
        app.state.keys = keys
        if isinstance(redis, Redis):  # redis-py's asyncio cluster client has no pub/sub
            listener = KeyChangeListener(redis, keys)
            await listener.start()
            stack.push_async_callback(listener.stop)

        process_id = f"proc_{secrets.token_hex(6)}"
        app.state.process_id = process_id
        scripts = scripts_client(redis, settings)  # the request path's scripts
        if isinstance(scripts, MultiplexedConnection):
            stack.push_async_callback(scripts.aclose)
        meter = Meter(redis, settings, process_id, scripts=scripts)
        gate = UpstreamGate(redis, settings, process_id)
        app.state.meter, app.state.gate = meter, gate
        leases = LeaseKeeper(meter, gate)
        await leases.start()
        stack.push_async_callback(leases.stop)
        deferred = DeferredWrites(redis)
        stack.push_async_callback(deferred.drain, settings.shutdown_grace_s)
        app.state.sapiom = SapiomService(
            redis,
            keys,
            meter,
            ttl_s=settings.sapiom_transaction_ttl_s,
            public_url=settings.public_url,
        )
        sweeper = Sweeper(redis, settings, process_id, fal)
        await sweeper.start()
        stack.push_async_callback(sweeper.stop)
        app.state.sweeper = sweeper
        app.state.money = MoneyPath(meter, gate, fal, app.state.inflight, leases, deferred, sweeper)
        fal_follower = QueueFollower(app.state.money, settings)  # fal's queue API (falapi)
        stack.push_async_callback(fal_follower.stop)
        app.state.fal_follower = fal_follower

        # The ledger at rest (issue 12): the SQL archive, migrated here, and its drainer.
        ledger = LedgerService.from_settings(redis, settings)
        stack.callback(ledger.close)
        try:
            await ledger.migrate()
        except Unavailable:  # money in flight does not need the archive: serve, retry later
            log.error("the ledger archive database is unreachable; it is migrated when it is back")
        app.state.ledger = ledger
        metrics_of(app).key_label = settings.metrics_key_label
        if settings.ledger_drain_interval_s > 0:
            drainer = ledger.drainer(process_id)
            await drainer.start()
            stack.push_async_callback(drainer.stop)

        if settings.sandbox_mode and not is_worker():  # a worker's parent already did this
            await sandbox_welcome(settings, keys, app.state.admin_token)
        stack.callback(mark_process_dead)
        stack.callback(unsettled, settled())  # start-up's objects out of the collector's way
        yield
        await app.state.inflight.drain(settings.shutdown_grace_s)


def _known_models(app: FastAPI) -> dict[str, str]:
    return model_names(app.state.catalog)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the gateway application; nothing is connected until the lifespan runs."""

    settings = settings or get_settings()
    app = FastAPI(
        title="falgate",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        **fastapi_telemetry(),
        docs_url=None,  # served by app.ops.docs from packaged assets (works offline)
        redoc_url=None,
        openapi_tags=[
            {"name": "generation", "description": "Metered image generation."},
            {"name": "catalog", "description": "Models and prices."},
            {"name": "usage", "description": "The calling key's budget and spend."},
            {"name": "admin", "description": "Keys, usage and ledger (admin token)."},
            {"name": "operations", "description": "Health and metrics."},
            {"name": "sapiom", "description": "The control plane of Sapiom-wrapped clients."},
            {"name": "fal", "description": "fal's own API, for fal's official clients."},
        ],
    )
    app.state.settings = settings
    add_docs(app)
    add_exception_handlers(app)
    app.include_router(generation_router)
    app.include_router(catalog_router)
    app.include_router(keys_router)
    app.include_router(health_router)
    app.include_router(usage_router)
    app.include_router(ledger_router)
    app.include_router(sapiom_router)
    app.include_router(fal_router)  # fal's own API (SPEC section 11)
    install_dashboard(app)
    app.openapi = lambda: contract_document(app)  # type: ignore[method-assign]
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        idle_timeout_s=settings.body_timeout_s,
        deadline_s=settings.body_deadline_s,
    )
    app.add_middleware(RequestContextMiddleware, settings=settings)
    return app


__all__ = ["StartupError", "create_app", "lifespan"]
