"""The sandbox as a real uvicorn server in the test loop, reset before every test."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from app.sandbox import SandboxControl, embedded_sandbox

LATENCY_MS = 20


@pytest.fixture(scope="session")
async def sandbox_url() -> AsyncIterator[str]:
    async with embedded_sandbox("127.0.0.1", 0, latency_ms=LATENCY_MS) as url:
        yield url


@pytest.fixture
async def control(sandbox_url: str) -> AsyncIterator[SandboxControl]:
    async with SandboxControl(sandbox_url) as ctl:
        await ctl.reset()
        yield ctl
        await ctl.reset()


@pytest.fixture
async def fal(sandbox_url: str, control: SandboxControl) -> AsyncIterator[httpx.AsyncClient]:
    """A raw HTTP client speaking to the sandbox with a fal key."""
    async with httpx.AsyncClient(
        base_url=sandbox_url, headers={"Authorization": "Key id:secret"}, timeout=10
    ) as client:
        yield client
