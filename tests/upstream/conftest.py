"""A real sandbox server in the test loop and FalClients pointed at it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import pytest

from app.sandbox import SandboxControl, embedded_sandbox
from app.settings import Settings
from app.upstream import FalClient

FAL_SECRET = "key-id:fal-secret-MUST-NOT-LEAK"
MakeClient = Callable[..., Awaitable[FalClient]]


@pytest.fixture(scope="session")
async def upstream_url() -> AsyncIterator[str]:
    async with embedded_sandbox("127.0.0.1", 0, latency_ms=20) as url:
        yield url


@pytest.fixture
async def control(upstream_url: str) -> AsyncIterator[SandboxControl]:
    async with SandboxControl(upstream_url) as ctl:
        await ctl.reset()
        yield ctl
        await ctl.reset()


def fal_settings(base_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "fal_key": FAL_SECRET,
        "fal_run_url": base_url,
        "fal_queue_url": base_url + "/queue",
        "upstream_retry_backoff_s": 0.01,
        "upstream_poll_interval_s": 0.01,
        "upstream_max_retries": 2,
        "upstream_read_timeout_s": 5,
        "upstream_request_timeout_s": 10,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


@pytest.fixture
async def make_client(upstream_url: str, control: SandboxControl) -> AsyncIterator[MakeClient]:
    """``await make_client(upstream_mode="sync", ...)``: a started FalClient, closed after."""
    async with AsyncExitStack() as stack:

        async def make(**overrides: Any) -> FalClient:
            base = overrides.pop("base_url", upstream_url)
            return await stack.enter_async_context(FalClient(fal_settings(base, **overrides)))

        yield make


@pytest.fixture
async def fal(make_client: MakeClient) -> FalClient:
    return await make_client()
