"""A private real ``redis-server`` for the gate's unit tests (the shared one serves gateways)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from app.redis import EmbeddedRedis
from app.settings import Settings


@pytest.fixture(scope="session")
def gate_redis_server(private_redis_server: EmbeddedRedis) -> EmbeddedRedis:
    return private_redis_server


@pytest.fixture
def gate_settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path,
        upstream_max_concurrent=2,
        upstream_queue_timeout_s=30,
        process_lease_s=1,
    )


@pytest.fixture
async def gate_redis(gate_redis_server: EmbeddedRedis) -> AsyncIterator[Any]:
    client = aioredis.Redis.from_url(
        gate_redis_server.url,
        decode_responses=True,
        socket_timeout=1,
        socket_connect_timeout=1,
        max_connections=500,
    )
    await client.flushall()
    yield client
    await client.aclose()
