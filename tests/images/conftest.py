"""An origin server on loopback that serves good, bad and hostile images over real HTTP."""

from __future__ import annotations

import asyncio
import io
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from app.sandbox import serve_app


def encode(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def picture(width: int, height: int, mode: str = "RGB") -> Image.Image:
    return Image.new(mode, (width, height), (200, 30, 30) if mode == "RGB" else None)


def png_declaring(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header claims ``width`` x ``height`` (a decompression bomb)."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    data[16:20] = width.to_bytes(4, "big")
    data[20:24] = height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


PNG = encode(picture(64, 48), "PNG")
JPEG = encode(picture(64, 48), "JPEG")
WEBP = encode(picture(64, 48), "WEBP")
GIF = encode(picture(64, 48), "GIF")
BIG_BYTES = 50_000


@dataclass
class Origin:
    url: str
    port: int
    hits: list[str] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)


def origin_app(origin: Origin) -> Starlette:
    def served(request: Request) -> None:
        origin.hits.append(request.url.path)
        origin.hosts.append(request.headers.get("host", ""))

    async def image(request: Request) -> Response:
        served(request)
        body, media = {
            "png": (PNG, "image/png"),
            "jpg": (JPEG, "image/jpeg"),
            "webp": (WEBP, "image/webp"),
            "gif": (GIF, "image/gif"),
            # Content-Type says nothing useful: the bytes decide.
            "png-as-text": (PNG, "text/plain"),
            "html-as-png": (b"<html>not an image</html>", "image/png"),
            "svg": (b'<svg xmlns="http://www.w3.org/2000/svg"/>', "image/svg+xml"),
            "text": (b"hello", "text/plain"),
            "bomb": (png_declaring(100_000, 100_000), "image/png"),
            "bomb-mid": (png_declaring(10_000, 10_000), "image/png"),
            "large": (encode(picture(400, 300), "PNG"), "image/png"),
        }[request.path_params["name"]]
        return Response(body, media_type=media)

    async def redirect(request: Request) -> Response:
        served(request)
        return RedirectResponse(request.query_params["to"], status_code=302)

    async def chain(request: Request) -> Response:
        served(request)
        n = int(request.path_params["n"])
        if n == 0:
            return Response(PNG, media_type="image/png")
        return RedirectResponse(f"/chain/{n - 1}", status_code=307)

    async def big(request: Request) -> Response:
        served(request)

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(BIG_BYTES // 1000):
                yield b"\0" * 1000

        headers = {"content-length": str(BIG_BYTES)} if "declared" in request.query_params else {}
        return StreamingResponse(chunks(), media_type="image/png", headers=headers)

    async def drip(request: Request) -> Response:
        served(request)

        async def slowly() -> AsyncIterator[bytes]:
            yield PNG[:16]
            for _ in range(100):
                await asyncio.sleep(0.1)
                yield b"\0"

        return StreamingResponse(slowly(), media_type="image/png")

    async def slow(request: Request) -> Response:
        served(request)
        await asyncio.sleep(5)
        return Response(PNG, media_type="image/png")

    async def missing(request: Request) -> Response:
        served(request)
        return Response(b"nope", status_code=404)

    return Starlette(
        routes=[
            Route("/img/{name}", image),
            Route("/redirect", redirect),
            Route("/chain/{n:int}", chain),
            Route("/big", big),
            Route("/drip", drip),
            Route("/slow", slow),
            Route("/missing", missing),
        ]
    )


@pytest.fixture(scope="session")
async def origin_server() -> AsyncIterator[Origin]:
    origin = Origin(url="", port=0)
    async with serve_app(origin_app(origin)) as url:
        origin.url = url
        origin.port = int(url.rsplit(":", 1)[1])
        yield origin


@pytest.fixture
def origin(origin_server: Origin) -> Origin:
    origin_server.hits.clear()
    origin_server.hosts.clear()
    return origin_server
