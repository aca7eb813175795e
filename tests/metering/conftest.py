"""A real ``redis-server`` for the metering and rate-limit unit tests (no fakes)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from app.catalog.pricing import Price
from app.redis import EmbeddedRedis
from app.settings import Settings


@pytest.fixture(scope="session")
def metering_redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("metering-redis"), persist=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path,
        default_rpm=100_000,
        default_max_concurrent=10_000,
        redis_socket_timeout_s=0.5,
        redis_connect_timeout_s=0.5,
    )


def client_for(url: str, settings: Settings, **kwargs: Any) -> aioredis.Redis:
    return aioredis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=settings.redis_socket_timeout_s,
        socket_connect_timeout=settings.redis_connect_timeout_s,
        max_connections=kwargs.pop("max_connections", 1000),
        **kwargs,
    )


@pytest.fixture
async def r(metering_redis_server: EmbeddedRedis, settings: Settings) -> AsyncIterator[Any]:
    client = client_for(metering_redis_server.url, settings)
    await client.flushall()
    yield client
    await client.aclose()


async def _make_key(
    r: Any,
    key_id: str,
    *,
    budget_micro: int | None = None,
    period: str = "total",
    rpm: int | None = None,
    max_concurrent: int | None = None,
    status: str = "active",
    expires_at: float | None = None,
) -> None:
    """Write a key record the way the keys service does."""
    await r.hset(
        f"{{k:{key_id}}}:meta",
        mapping={
            "id": key_id,
            "name": key_id,
            "status": status,
            "created_at": str(int(time.time())),
            "expires_at": "" if expires_at is None else str(expires_at),
            "budget_micro": "" if budget_micro is None else str(budget_micro),
            "budget_period": period,
            "rpm": "" if rpm is None else str(rpm),
            "max_concurrent": "" if max_concurrent is None else str(max_concurrent),
            "models": "",
        },
    )
    await r.sadd("falgate:keys", key_id)


@pytest.fixture
def make_key(r: Any) -> Any:
    """``await make_key("key_a", budget_micro=..., period=..., rpm=..., ...)``."""

    async def make(key_id: str, **fields: Any) -> None:
        await _make_key(r, key_id, **fields)

    return make


def _price(amount: int, pixels: int = 1_000_000, unit_price: int = 15_000) -> Price:
    return Price(amount=amount, pixels=pixels, unit_price=unit_price)


@pytest.fixture
def price() -> Any:
    """``price(amount, pixels=..., unit_price=...)`` -> a :class:`Price`."""
    return _price


@pytest.fixture
def meter(r: Any, settings: Settings) -> Any:
    from app.metering import Meter

    return Meter(r, settings, "proc_test")


@pytest.fixture
def write_key() -> Any:
    """``await write_key(client, key_id, **fields)`` for a client of another server."""
    return _make_key


@pytest.fixture
def connect(settings: Settings) -> Any:
    """``connect(url)`` -> a client configured like the gateway's (short timeouts)."""
    return lambda url: client_for(url, settings)
