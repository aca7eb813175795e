"""Loading a client's input image without letting the URL reach inside the network (SSRF).

The host is resolved once; every address it resolves to must be public (unless the host is
allow-listed) and the connection is made to that very address, with the original name kept for
the ``Host`` header, SNI and certificate checks, so a second DNS answer cannot redirect it.
Redirects are followed by hand, each hop checked the same way.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import urllib.request
from collections.abc import Awaitable, Callable, Sequence

import httpx

from app.errors import InvalidRequest, PayloadTooLarge
from app.images.image import InputImage, probe_image
from app.settings import Settings

Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
"""``(host, port) -> IP addresses``; injectable so tests can play DNS."""

MAX_REDIRECTS = 3
_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
_PARAM = "image_url"
_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


async def resolve_host(host: str, port: int) -> list[str]:
    """Resolve ``host`` with the system resolver (in a worker thread), addresses in order."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: list[str] = []
    for *_, sockaddr in infos:
        address = str(sockaddr[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


def is_public_address(address: _IPAddress) -> bool:
    """True for globally routable unicast addresses only.

    IPv6 forms that embed an IPv4 address (mapped, 6to4, Teredo, NAT64) are judged by the
    embedded address as well, so ``::ffff:127.0.0.1`` is as private as ``127.0.0.1``.
    """
    if isinstance(address, ipaddress.IPv6Address):
        embedded: list[ipaddress.IPv4Address] = []
        if address.ipv4_mapped is not None:
            embedded.append(address.ipv4_mapped)
        if address.sixtofour is not None:
            embedded.append(address.sixtofour)
        if address.teredo is not None:
            embedded.extend(address.teredo)
        if address in _NAT64:
            embedded.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        if any(not is_public_address(inner) for inner in embedded):
            return False
    return not (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_reserved
        or address.is_multicast
        or address.is_unspecified
        or not address.is_global
    )


async def load_input_image(
    url: str,
    settings: Settings,
    *,
    client: httpx.AsyncClient | None = None,
    resolver: Resolver = resolve_host,
) -> InputImage:
    """Fetch (``http(s)``) or decode (``data:``) the image at ``url`` and measure it.

    Raises ``InvalidRequest`` (param ``image_url``) for a refused or unreachable URL or for
    content that is not JPEG/PNG/WebP, and ``PayloadTooLarge`` over ``max_input_bytes`` or
    ``max_input_pixels``. ``client`` is used for the fetch when given; its connection pool is
    keyed by the resolved address, so give it a client that fetches input images only.
    """
    if url[:5].lower() == "data:":
        data = _decode_data_uri(url, settings.max_input_bytes)
    else:
        data = await _fetch(url, settings, client, resolver)
    return probe_image(data, max_pixels=settings.max_input_pixels, param=_PARAM)


def _decode_data_uri(url: str, max_bytes: int) -> bytes:
    # base64 inflates by 4/3; refuse before decoding what could never fit.
    if len(url) > max_bytes * 4 // 3 + 1024:
        raise _too_large(max_bytes)
    try:
        with urllib.request.DataHandler().data_open(urllib.request.Request(url)) as resp:
            data: bytes = resp.read()
    except ValueError as exc:
        raise InvalidRequest("'image_url' is not a valid data: URI.", param=_PARAM) from exc
    if len(data) > max_bytes:
        raise _too_large(max_bytes)
    return data


def _too_large(max_bytes: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"The input image is larger than {max_bytes} bytes.", param=_PARAM)


def _parse_target(url: str | httpx.URL) -> httpx.URL:
    try:
        target = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise InvalidRequest("'image_url' is not a valid URL.", param=_PARAM) from exc
    if target.scheme not in ("http", "https") or not target.host:
        raise InvalidRequest("'image_url' must be an http(s) URL or a data: URI.", param=_PARAM)
    if target.userinfo:
        raise InvalidRequest("'image_url' must not contain credentials.", param=_PARAM)
    return target


def _port_of(target: httpx.URL) -> int:
    if target.port is not None:
        return target.port
    return 443 if target.scheme == "https" else 80


def _is_allow_listed(target: httpx.URL, settings: Settings) -> bool:
    host = target.host.lower()
    port = _port_of(target)
    bracketed = f"[{host}]" if ":" in host else host
    allowed = {h.lower() for h in settings.image_fetch_allow_hosts}
    if {host, bracketed, f"{host}:{port}", f"{bracketed}:{port}"} & allowed:
        return True
    return any(_under_prefix(target, p) for p in settings.image_fetch_allow_url_prefixes)


def _under_prefix(target: httpx.URL, prefix: str) -> bool:
    """``target`` is on the same scheme, host and port as ``prefix`` and its path lies under
    the prefix's path (compared after httpx's normalisation, so ``/files/../x`` is not)."""
    try:
        allowed = httpx.URL(prefix)
    except (httpx.InvalidURL, TypeError, ValueError):
        return False
    path = allowed.path if allowed.path.endswith("/") else allowed.path + "/"
    return (
        target.scheme == allowed.scheme
        and target.host.lower() == allowed.host.lower()
        and _port_of(target) == _port_of(allowed)
        and target.path.startswith(path)
        and ".." not in target.path.split("/")
        and "%2" not in target.raw_path.decode("ascii", "replace").lower()
    )


async def _pinned_address(target: httpx.URL, settings: Settings, resolver: Resolver) -> str:
    """The one address to connect to for ``target``, after the SSRF checks."""
    try:
        addresses = [ipaddress.ip_address(a) for a in await resolver(target.host, _port_of(target))]
    except (OSError, ValueError) as exc:
        raise InvalidRequest(
            f"Could not resolve the host of 'image_url' ({target.host}).", param=_PARAM
        ) from exc
    if not addresses:
        raise InvalidRequest(
            f"Could not resolve the host of 'image_url' ({target.host}).", param=_PARAM
        )
    if not _is_allow_listed(target, settings) and not all(is_public_address(a) for a in addresses):
        raise InvalidRequest(
            "'image_url' points to a private or reserved network address.", param=_PARAM
        )
    return str(addresses[0])


async def _fetch(
    url: str,
    settings: Settings,
    client: httpx.AsyncClient | None,
    resolver: Resolver,
) -> bytes:
    # trust_env=False: an HTTP(S)_PROXY would connect by name and undo the address pinning.
    own_client = client is None
    http = client or httpx.AsyncClient(trust_env=False, follow_redirects=False)
    try:
        # Per-operation timeouts do not stop a server that drips one byte at a time.
        async with asyncio.timeout(settings.image_fetch_timeout_s * 3):
            return await _follow(_parse_target(url), settings, http, resolver)
    except TimeoutError as exc:
        raise InvalidRequest("Timed out fetching 'image_url'.", param=_PARAM) from exc
    except httpx.TimeoutException as exc:
        raise InvalidRequest("Timed out fetching 'image_url'.", param=_PARAM) from exc
    except httpx.HTTPError as exc:
        raise InvalidRequest("Could not fetch 'image_url'.", param=_PARAM) from exc
    finally:
        if own_client:
            await http.aclose()


async def _follow(
    target: httpx.URL,
    settings: Settings,
    http: httpx.AsyncClient,
    resolver: Resolver,
) -> bytes:
    timeout = httpx.Timeout(settings.image_fetch_timeout_s)
    for _ in range(MAX_REDIRECTS + 1):
        address = await _pinned_address(target, settings, resolver)
        extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
        request = http.build_request(
            "GET",
            target.copy_with(host=address),
            headers={
                "Host": target.netloc.decode("ascii"),
                "Accept": "image/jpeg, image/png, image/webp",
                # A compressed body would be inflated before our byte cap could see it.
                "Accept-Encoding": "identity",
            },
            extensions=extensions,
            timeout=timeout,
        )
        response = await http.send(request, stream=True, follow_redirects=False)
        try:
            if response.status_code in _REDIRECT_CODES:
                location = response.headers.get("location")
                if not location:
                    raise InvalidRequest(
                        "'image_url' answered with a redirect without a location.", param=_PARAM
                    )
                target = _parse_target(target.join(location))
                continue
            if response.status_code != 200:
                raise InvalidRequest(
                    f"Fetching 'image_url' failed with HTTP {response.status_code}.",
                    param=_PARAM,
                )
            return await _read_capped(response, settings.max_input_bytes)
        finally:
            await response.aclose()
    raise InvalidRequest(f"'image_url' redirected more than {MAX_REDIRECTS} times.", param=_PARAM)


async def _read_capped(response: httpx.Response, max_bytes: int) -> bytes:
    declared = response.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > max_bytes:
            raise _too_large(max_bytes)
    return bytes(body)
