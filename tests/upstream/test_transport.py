"""The aiohttp-backed httpx transport against the real sandbox: answers as httpx's own does,
and every failure is the httpx error that tells the fal client whether a POST may be re-sent."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app.redis import free_port
from app.sandbox import SandboxControl
from app.sandbox.server import serve_app
from app.upstream.transport import AiohttpTransport

FLUX = "fal-ai/flux/dev"
KEY = {"Authorization": "Key id:secret"}


def _client(base_url: str, **kwargs: object) -> httpx.AsyncClient:
    limits = kwargs.pop("limits", httpx.Limits(max_connections=10))
    assert isinstance(limits, httpx.Limits)
    return httpx.AsyncClient(
        base_url=base_url,
        headers=KEY,
        transport=AiohttpTransport(limits=limits),
        timeout=kwargs.pop("timeout", 5.0),  # type: ignore[arg-type]
    )


async def test_run_submit_status_and_result(upstream_url: str, control: SandboxControl) -> None:
    async with _client(upstream_url) as client:
        ran = await client.post(f"/{FLUX}", json={"prompt": "a fox", "image_size": "square"})
        assert ran.status_code == 200
        assert ran.json()["images"][0]["width"] == 512
        assert ran.headers["content-type"] == "application/json"
        assert ran.headers["x-fal-request-id"]
        submitted = await client.post(f"/queue/{FLUX}", json={"prompt": "a fox"})
        assert submitted.status_code == 200
        status = await client.get(submitted.json()["status_url"])
        assert status.status_code in (200, 202)
        missing = await client.get("/queue/fal-ai/flux/requests/nope/status")
        assert missing.status_code == 404
        refused = await client.post(f"/{FLUX}", json={"prompt": 1})
        assert refused.status_code == 422 and refused.json()["detail"]
    assert len(await control.requests()) == 2  # the run and the submit: jobs the sandbox took


async def test_refused_connection_is_a_connect_error() -> None:
    async with _client(f"http://127.0.0.1:{free_port()}") as client:
        with pytest.raises(httpx.ConnectError):
            await client.post(f"/{FLUX}", json={"prompt": "x"})


async def test_dropped_connection_is_not_a_connect_error(
    upstream_url: str, control: SandboxControl
) -> None:
    """The request reached the server: re-sending a POST could generate twice."""
    await control.add_fault(kind="drop", scope="run", count=1)
    async with _client(upstream_url) as client:
        with pytest.raises(httpx.TransportError) as caught:
            await client.post(f"/{FLUX}", json={"prompt": "x"})
    assert not isinstance(caught.value, httpx.ConnectError | httpx.ConnectTimeout)
    assert isinstance(caught.value, httpx.RemoteProtocolError | httpx.ReadError)


async def test_slow_answer_is_a_read_timeout(upstream_url: str, control: SandboxControl) -> None:
    await control.add_fault(kind="delay", scope="run", delay_ms=1500, count=1)
    async with _client(upstream_url, timeout=httpx.Timeout(5.0, read=0.3)) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.post(f"/{FLUX}", json={"prompt": "x"})


async def test_waiting_for_a_pooled_connection_times_out_as_connect(
    upstream_url: str, control: SandboxControl
) -> None:
    await control.add_fault(kind="delay", scope="run", delay_ms=1500, count=1)
    limits = httpx.Limits(max_connections=1)
    timeout = httpx.Timeout(5.0, connect=0.1, pool=0.1)
    async with _client(upstream_url, limits=limits, timeout=timeout) as client:
        slow = asyncio.create_task(client.post(f"/{FLUX}", json={"prompt": "slow"}))
        await asyncio.sleep(0.2)
        with pytest.raises(httpx.ConnectTimeout):
            await client.post(f"/{FLUX}", json={"prompt": "waits"})
        assert (await slow).status_code == 200


@pytest.fixture
async def gzip_server() -> AsyncIterator[str]:
    async def echo(request: Request) -> Response:
        body = b'{"seen": "%s"}' % request.headers.get("x-probe", "").encode()
        return Response(gzip.compress(body), headers={"Content-Encoding": "gzip"})

    async with serve_app(Starlette(routes=[Route("/", echo, methods=["POST"])])) as url:
        yield url


async def test_headers_reach_the_server_and_gzip_is_decoded(gzip_server: str) -> None:
    async with _client(gzip_server) as client:
        response = await client.post("/", json={}, headers={"X-Probe": "yes"})
    assert response.json() == {"seen": "yes"}
