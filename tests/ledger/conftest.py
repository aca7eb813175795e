"""The ledger archive's fixtures: a real PostgreSQL server (from the ``pgserver`` wheel) and
SQLite, so one test body runs against both; a private real Redis flushed per test."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from app.ledger.database import LedgerDatabase, database_url
from app.ledger.service import LedgerService
from app.redis import EmbeddedRedis
from app.settings import Settings
from tests.metering.conftest import client_for


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """A real PostgreSQL server for the session; yields its ``postgresql://`` URL.

    pgserver runs the server as its own unprivileged user when started by root, so its folder
    lives outside pytest's private (mode 700) temporary tree.
    """
    import pgserver

    root = Path(tempfile.mkdtemp(prefix="falgate-pg-"))
    root.chmod(0o755)
    server = pgserver.get_server(root / "data", cleanup_mode="stop")
    try:
        yield str(server.get_uri())
    finally:
        server.cleanup()
        shutil.rmtree(root, ignore_errors=True)


def _fresh_pg_database(server_url: str) -> str:
    name = f"ledger_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base, _, query = server_url.partition("?")
    base = base.rsplit("/", 1)[0]
    return f"{base}/{name}" + (f"?{query}" if query else "")


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty archive database URL: SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        return database_url(None, tmp_path)
    return database_url(_fresh_pg_database(request.getfixturevalue("postgres")), tmp_path)


@pytest.fixture
def ledger_settings(tmp_path: Path, ledger_url: str) -> Settings:
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        data_dir=tmp_path,
        ledger_database_url=ledger_url,
        default_rpm=100_000,
        default_max_concurrent=10_000,
    )


@pytest.fixture
async def r(private_redis_server: EmbeddedRedis, ledger_settings: Settings) -> AsyncIterator[Any]:
    client = client_for(private_redis_server.url, ledger_settings)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture
async def ledger(r: Any, ledger_settings: Settings) -> AsyncIterator[LedgerService]:
    service = LedgerService.from_settings(r, ledger_settings)
    await service.migrate()
    yield service
    service.close()


@pytest.fixture
def database(ledger: LedgerService) -> LedgerDatabase:
    return ledger.database
