"""Issue 15's upstream paths in the fal client: queue mode follows fal's status stream (one
status call per job, counted by the sandbox) and falls back to polling; both HTTP transports
(aiohttp under httpx, the default, and httpcore) speak both protocols."""

from __future__ import annotations

import pytest

from app.errors import UpstreamError
from app.sandbox import SandboxControl
from app.upstream import UpstreamCall
from app.upstream.transport import AiohttpTransport, DirectClient
from tests.conftest import free_port
from tests.upstream.conftest import MakeClient

FLUX = "fal-ai/flux/dev"
CALL = UpstreamCall(FLUX, {"prompt": "a fox", "image_size": "square"})


async def _count_status_calls(control: SandboxControl) -> None:
    # A zero-delay rule that matches every status call (stream or poll) counts them in ``hits``.
    await control.add_fault(kind="delay", scope="status", delay_ms=0)


async def _status_calls(control: SandboxControl) -> int:
    rules = (await control.config())["faults"]
    return int(rules[0]["hits"])


async def test_queue_mode_waits_on_one_status_stream(
    make_client: MakeClient, control: SandboxControl
) -> None:
    await control.configure(latency_ms=300)
    await _count_status_calls(control)
    fal = await make_client()
    result = await fal.run(CALL)
    assert result.images[0].width == 512
    assert await _status_calls(control) == 1


async def test_polling_instead_of_the_stream_when_turned_off(
    make_client: MakeClient, control: SandboxControl
) -> None:
    await control.configure(latency_ms=300)
    await _count_status_calls(control)
    fal = await make_client(upstream_status_stream=False, upstream_poll_interval_s=0.05)
    await fal.run(CALL)
    assert await _status_calls(control) >= 3  # 300 ms of polls every 10..50 ms


async def test_a_refused_stream_falls_back_to_polling(
    make_client: MakeClient, control: SandboxControl
) -> None:
    """A fal (or proxy) without the stream answers 404/405 to it: the job is still followed."""
    await control.configure(latency_ms=50)
    await control.add_fault(kind="error", scope="status", status_code=405, count=1)
    fal = await make_client()
    result = await fal.run(CALL)
    assert result.images and result.request_id
    [entry] = await control.requests()
    assert entry["status"] == "completed"


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
@pytest.mark.parametrize("mode", ["queue", "sync"])
async def test_both_transports_both_protocols(
    make_client: MakeClient, control: SandboxControl, transport: str, mode: str
) -> None:
    fal = await make_client(upstream_transport=transport, upstream_mode=mode)
    uses_aiohttp = isinstance(fal._http._transport, AiohttpTransport)  # type: ignore[union-attr]
    assert uses_aiohttp == (transport == "aiohttp")
    result = await fal.run(CALL)
    assert (result.images[0].width, result.images[0].height) == (512, 512)


_PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


def _no_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
@pytest.mark.parametrize("mode", ["queue", "sync"])
async def test_without_a_proxy_calls_go_straight_through_the_transport(
    make_client: MakeClient, monkeypatch: pytest.MonkeyPatch, transport: str, mode: str
) -> None:
    """No ``httpx.AsyncClient`` in between (issue 15): the request is httpx's, sent by the
    transport itself, with the client's default headers."""
    _no_proxies(monkeypatch)
    fal = await make_client(upstream_transport=transport, upstream_mode=mode)
    assert isinstance(fal._http, DirectClient)
    result = await fal.run(CALL)
    assert (result.images[0].width, result.images[0].height) == (512, 512)


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
@pytest.mark.parametrize("mode", ["queue", "sync"])
async def test_a_proxy_named_by_the_environment_carries_the_calls(
    make_client: MakeClient,
    upstream_url: str,
    monkeypatch: pytest.MonkeyPatch,
    transport: str,
    mode: str,
) -> None:
    """A fal reachable only through ``HTTP_PROXY`` (a company's egress proxy), on either
    transport: the proxy is the sandbox itself, which answers a proxy's absolute-form
    requests."""
    _no_proxies(monkeypatch)
    unreachable = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    options = {"base_url": unreachable, "upstream_mode": mode, "upstream_transport": transport}
    direct = await make_client(**options, upstream_max_retries=0)
    with pytest.raises(UpstreamError):
        await direct.run(CALL)
    monkeypatch.setenv("HTTP_PROXY", upstream_url)
    proxied = await make_client(**options)
    result = await proxied.run(CALL)
    assert (result.images[0].width, result.images[0].height) == (512, 512)


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
async def test_no_proxy_exempts_a_host_from_the_environments_proxy(
    make_client: MakeClient, monkeypatch: pytest.MonkeyPatch, transport: str
) -> None:
    """``NO_PROXY`` names fal's host: the calls go straight to it, past a proxy that is down."""
    _no_proxies(monkeypatch)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")  # nothing listens
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    fal = await make_client(upstream_transport=transport, upstream_max_retries=0)
    result = await fal.run(CALL)
    assert (result.images[0].width, result.images[0].height) == (512, 512)
