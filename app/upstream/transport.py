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
import urllib.request
from collections.abc import Iterator, Mapping
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


#: Hosts whose proxy is remembered (fal's two hosts, or the sandbox, in practice).
_PROXY_CACHE = 64


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
        self._proxies: dict[tuple[str, str], str | None] = {}

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

    def _proxy_for(self, url: httpx.URL) -> str | None:
        """The proxy ``HTTP_PROXY``/``HTTPS_PROXY``/``ALL_PROXY`` name for this URL, unless
        ``NO_PROXY`` exempts its host: what httpx's client honoured before this transport (a
        company's egress proxy in front of fal). Read from the environment once per scheme
        and host: aiohttp's own ``trust_env`` reads it, and ``~/.netrc``, on every request,
        which tripled the cost of a call."""
        where = (url.scheme, url.host)
        if where not in self._proxies:
            if len(self._proxies) >= _PROXY_CACHE:
                self._proxies.clear()
            proxies = urllib.request.getproxies_environment()
            proxy = proxies.get(url.scheme) or proxies.get("all")
            if proxy and urllib.request.proxy_bypass(url.host):  # NO_PROXY
                proxy = None
            self._proxies[where] = proxy or None
        return self._proxies[where]

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
                proxy=self._proxy_for(request.url),
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


#: httpx's client's own default headers, sent as it sent them (``Accept-Encoding`` without the
#: codecs this process may lack), so that fal sees the same requests as before.
_DEFAULT_HEADERS = {"Accept": "*/*", "Accept-Encoding": "gzip, deflate", "Connection": "keep-alive"}


#: Header sets a :class:`DirectClient` keeps merged with its defaults.
_MERGED_HEADER_SETS = 16


class DirectClient:
    """httpx requests and responses, sent straight through an httpx transport.

    Per call, ``httpx.AsyncClient`` merges its defaults into new header and URL objects, runs
    the auth and redirect flows, event hooks and cookie handling, and wraps the response
    stream: 20-50 µs of CPU per call here (``bench/upstream_client.py``), none of which fal's
    calls use (no auth flow, no redirects followed, no cookies kept). This sends the same
    ``httpx.Request`` (default headers, timeouts) to the same transport and reads the answer
    whole, as the client does without ``stream=True``. Errors are the transport's httpx errors.
    """

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport,
        *,
        headers: Mapping[str, str],
        timeout: httpx.Timeout,
    ) -> None:
        self._transport = transport
        self._headers = httpx.Headers({**_DEFAULT_HEADERS, **headers})
        self._merged: dict[tuple[tuple[str, str], ...], httpx.Headers] = {}
        self._extensions = {"timeout": timeout.as_dict()}
        self._closed = False

    async def request(
        self,
        method: str,
        url: httpx.URL | str,
        *,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        if self._closed:
            raise RuntimeError("the client is closed")
        merged = self._headers
        if headers:
            merged = self._with(headers)
        request = httpx.Request(
            method, url, content=content, headers=merged, extensions=self._extensions
        )
        response = await self._transport.handle_async_request(request)
        response.request = request
        try:
            await response.aread()
        except BaseException:
            await response.aclose()
            raise
        return response

    def _with(self, headers: Mapping[str, str]) -> httpx.Headers:
        """The defaults with a call's own headers, built once per set: the fal client sends
        a handful of sets (JSON, the status stream, the queue's start deadline)."""
        key = tuple(headers.items())
        merged = self._merged.get(key)
        if merged is None:
            if len(self._merged) >= _MERGED_HEADER_SETS:
                self._merged.clear()
            merged = self._merged[key] = self._headers.copy()
            merged.update(headers)
        return merged

    async def aclose(self) -> None:
        self._closed = True
        await self._transport.aclose()


#: What the fal client sends its calls with (see :func:`upstream_http`).
UpstreamHTTP = DirectClient | CookielessAsyncClient


def environment_proxies() -> bool:
    """Whether ``HTTP_PROXY``/``HTTPS_PROXY``/``ALL_PROXY`` (any case) name a proxy, which
    httpx's client honours on its own transport and :class:`DirectClient` leaves to the
    transport (:class:`AiohttpTransport` honours them itself)."""
    return any(scheme != "no" for scheme in urllib.request.getproxies_environment())


def upstream_http(
    transport: httpx.AsyncBaseTransport | None,
    *,
    headers: Mapping[str, str],
    timeout: httpx.Timeout,
    limits: httpx.Limits,
) -> UpstreamHTTP:
    """The fal client's HTTP client on ``transport`` (None: httpx's own, httpcore): a
    :class:`DirectClient`; or, for httpx's own transport when the environment names a proxy,
    httpx's client without a cookie jar, which mounts its proxy transports from it (httpx
    reads the environment only when it builds the transport itself)."""
    if transport is None and environment_proxies():
        return CookielessAsyncClient(
            headers=headers,
            timeout=timeout,
            limits=limits,
            follow_redirects=False,
            transport=transport,
        )
    return DirectClient(
        transport if transport is not None else httpx.AsyncHTTPTransport(limits=limits),
        headers=headers,
        timeout=timeout,
    )
