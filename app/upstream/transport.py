"""An httpx transport on aiohttp's client: the fal client keeps talking httpx, the bytes move
through aiohttp's connection pool and C HTTP parser.

Why (issue 15, measured with ``py-spy`` and per-request CPU time against the sandbox): httpx's
own transport (httpcore over anyio) costs the gateway about 0.8 ms of CPU per upstream call at
concurrency 1, 1.2 ms at 16 and 4.6 ms at 64, most of it pool bookkeeping (every pooled
connection is re-checked on every request and every release) and anyio's stream and lock layers;
sharding the pool into four clients brings 64 down to 1.2 ms. The same calls through this
transport cost 0.6 / 0.4 / 0.5 ms, flat in concurrency. HTTP/2 was not an option to measure:
the sandbox (like most fal-compatible servers behind uvicorn) speaks HTTP/1.1 only.

What must not change is how failures are classified, because the fal client decides on it
whether re-sending a POST is safe (a submit or sync run that reached fal must never be sent
twice). So aiohttp's errors are translated by what they mean, not by aiohttp's class tree
(where a server dropping the connection mid-request is a "connection error"):

=====================================================  =============================
aiohttp                                                httpx
=====================================================  =============================
``ConnectionTimeoutError`` (pool wait or connect)      ``ConnectTimeout`` (not sent)
``ClientConnectorError`` (refused, DNS, TLS setup)     ``ConnectError``   (not sent)
``SocketTimeoutError`` / other ``ServerTimeoutError``  ``ReadTimeout``
``ServerDisconnectedError``                            ``RemoteProtocolError``
``ClientPayloadError``, ``ClientOSError``, the rest    ``ReadError``
``InvalidURL``, ``NonHttpUrlClientError``              ``UnsupportedProtocol``
=====================================================  =============================

Bodies are read whole (fal's JSON answers are small) and the connection goes straight back to
the pool; httpx still decodes ``Content-Encoding`` (aiohttp's own decompression is off).
"""

from __future__ import annotations

import contextlib
import functools
import http.cookiejar
import ssl
from collections.abc import Iterator
from typing import Any

import aiohttp
import certifi
import httpx

_ERRORS: tuple[tuple[type[BaseException], type[httpx.TransportError]], ...] = (
    (aiohttp.ConnectionTimeoutError, httpx.ConnectTimeout),
    (aiohttp.ClientConnectorError, httpx.ConnectError),
    (aiohttp.ServerTimeoutError, httpx.ReadTimeout),
    (aiohttp.ServerDisconnectedError, httpx.RemoteProtocolError),
    (aiohttp.InvalidURL, httpx.UnsupportedProtocol),
    (aiohttp.NonHttpUrlClientError, httpx.UnsupportedProtocol),
    (aiohttp.ClientError, httpx.ReadError),
    (TimeoutError, httpx.ReadTimeout),
)


def translate(exc: BaseException) -> httpx.TransportError | None:
    """The httpx error for an aiohttp failure (None for anything else, e.g. a cancellation)."""
    for source, target in _ERRORS:
        if isinstance(exc, source):
            return target(str(exc) or type(exc).__name__)
    return None


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    try:
        yield
    except (aiohttp.ClientError, TimeoutError) as exc:
        mapped = translate(exc)
        if mapped is None:  # pragma: no cover - every ClientError/TimeoutError maps
            raise
        raise mapped from exc


@functools.lru_cache(maxsize=64)
def _client_timeout(
    connect: float | None, pool: float | None, read: float | None
) -> aiohttp.ClientTimeout:
    """httpx's timeouts as aiohttp's (one object per distinct set: a client uses one or two)."""
    acquire = None if connect is None or pool is None else connect + pool
    return aiohttp.ClientTimeout(total=None, connect=acquire, sock_connect=connect, sock_read=read)


class AiohttpTransport(httpx.AsyncBaseTransport):
    """``httpx.AsyncClient(transport=AiohttpTransport(limits=...))``; one aiohttp session,
    opened on first use inside the running event loop and closed by ``aclose()``."""

    def __init__(
        self, *, limits: httpx.Limits | None = None, verify: ssl.SSLContext | bool = True
    ) -> None:
        self._limits = limits or httpx.Limits()
        if verify is True:
            verify = ssl.create_default_context(cafile=certifi.where())
        self._ssl: ssl.SSLContext | bool = verify
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        limits = self._limits
        connector = aiohttp.TCPConnector(
            limit=limits.max_connections or 0,
            keepalive_timeout=limits.keepalive_expiry or 0.0,
            ssl=self._ssl,
            enable_cleanup_closed=False,
        )
        return aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
            timeout=aiohttp.ClientTimeout(total=None),
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._session is None or self._session.closed:
            self._session = self._open()
        timeout: dict[str, float | None] = request.extensions.get("timeout", {})
        with _translated():
            async with self._session.request(
                request.method,
                str(request.url),
                headers=request.headers.multi_items(),
                data=await request.aread() or None,
                allow_redirects=False,
                compress=None,
                timeout=_client_timeout(
                    timeout.get("connect"), timeout.get("pool"), timeout.get("read")
                ),
            ) as response:
                content = await response.read()
                return httpx.Response(
                    status_code=response.status,
                    headers=response.raw_headers,
                    stream=httpx.ByteStream(content),
                    request=request,
                    extensions={
                        "http_version": b"HTTP/1.1",
                        "reason_phrase": (response.reason or "").encode(),
                    },
                )

    async def aclose(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()


class _RefusingJar(http.cookiejar.CookieJar):
    """A cookie jar that never holds a cookie."""

    def set_cookie(self, cookie: http.cookiejar.Cookie) -> None:
        return None

    def extract_cookies(self, response: Any, request: Any) -> None:
        return None


class _NoCookies(httpx.Cookies):
    """httpx's cookies, always empty; reading a response's ``Set-Cookie`` is skipped."""

    def __init__(self) -> None:
        super().__init__(_RefusingJar())

    def extract_cookies(self, response: httpx.Response) -> None:
        return None


_NO_COOKIES = _NoCookies()


class CookielessAsyncClient(httpx.AsyncClient):
    """An ``httpx.AsyncClient`` that keeps no cookies.

    One client carries every team's calls to fal, so a cookie fal set on one call must not
    ride along on the next one, whoever makes it; httpx's client keeps a jar and has no
    setting to turn it off (aiohttp's own jar is already a ``DummyCookieJar``). Skipping the
    jar also skips building urllib request and response objects for every answer (~50 µs of
    CPU per call, issue 15).
    """

    @property
    def cookies(self) -> httpx.Cookies:
        return _NO_COOKIES

    @cookies.setter
    def cookies(self, cookies: Any) -> None:
        return None
