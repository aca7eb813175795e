"""fal's cookies are not kept: one client carries every team's calls, so a cookie set on one
call must not be sent on the next (whoever makes it), on either HTTP transport.

The upstream is a real HTTP server answering fal's sync route, setting a cookie on every
answer and recording the ``Cookie`` header of every request.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from app.upstream import FalClient, UpstreamCall
from app.upstream.transport import AiohttpTransport
from tests.upstream.conftest import fal_settings

CALL = UpstreamCall("fal-ai/flux/dev", {"prompt": "a fox", "image_size": "square"})
ANSWER = {
    "images": [
        {"url": "https://fal.media/x.jpg", "width": 64, "height": 64, "content_type": "image/jpeg"}
    ],
    "seed": 7,
}


class _CookieSetter(BaseHTTPRequestHandler):
    seen: list[str | None] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.seen.append(self.headers.get("cookie"))
        body = json.dumps(ANSWER).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Set-Cookie", "lb=node-7; Path=/; Max-Age=3600")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        return None


@pytest.fixture
def upstream() -> Iterator[str]:
    _CookieSetter.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _CookieSetter)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


async def test_httpx_would_send_the_cookie_back(upstream: str) -> None:
    """The control: a plain httpx client keeps the cookie and sends it on the next call."""
    async with httpx.AsyncClient(transport=AiohttpTransport()) as client:
        for _ in range(2):
            await client.post(f"{upstream}/fal-ai/flux/dev", content=b"{}")
    assert _CookieSetter.seen == [None, "lb=node-7"]


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
async def test_the_fal_client_sends_no_cookie_fal_set(upstream: str, transport: str) -> None:
    settings = fal_settings(upstream, upstream_mode="sync", upstream_transport=transport)
    async with FalClient(settings) as fal:
        results = [await fal.run(CALL) for _ in range(3)]
    assert [r.images[0].width for r in results] == [64, 64, 64]
    assert _CookieSetter.seen == [None, None, None]
