"""Input images are measured from their bytes, within byte and pixel limits, bombs refused."""

from __future__ import annotations

import base64
import urllib.parse
import warnings
from decimal import Decimal
from typing import Any

import pytest

from app.errors import InvalidRequest, PayloadTooLarge
from app.images import load_input_image, probe_image, to_data_uri
from app.settings import Settings
from tests.images.conftest import (
    BIG_BYTES,
    GIF,
    JPEG,
    PNG,
    WEBP,
    Origin,
    encode,
    picture,
    png_declaring,
)


def settings(origin: Origin, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "image_fetch_allow_hosts": [f"127.0.0.1:{origin.port}"],
        "image_fetch_timeout_s": 2,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


@pytest.mark.parametrize(
    ("name", "data", "content_type"),
    [
        ("png", PNG, "image/png"),
        ("jpg", JPEG, "image/jpeg"),
        ("webp", WEBP, "image/webp"),
        ("png-as-text", PNG, "image/png"),  # the bytes decide, not the header
    ],
)
async def test_images_over_http_are_kept_byte_for_byte(
    origin: Origin, name: str, data: bytes, content_type: str
) -> None:
    image = await load_input_image(f"{origin.url}/img/{name}", settings(origin))
    assert image.data == data
    assert (image.width, image.height, image.content_type) == (64, 48, content_type)


@pytest.mark.parametrize("name", ["gif", "svg", "text", "html-as-png"])
async def test_only_jpeg_png_webp(origin: Origin, name: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        await load_input_image(f"{origin.url}/img/{name}", settings(origin))
    assert caught.value.param == "image_url"
    assert "JPEG, PNG or WebP" in caught.value.message


async def test_data_uris(origin: Origin) -> None:
    config = settings(origin)
    b64 = "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert (await load_input_image(b64, config)).data == PNG
    # Not base64: percent-encoded bytes are data URIs too.
    plain = "data:image/jpeg," + urllib.parse.quote_from_bytes(JPEG)
    assert (await load_input_image(plain, config)).data == JPEG
    gif = "data:image/gif;base64," + base64.b64encode(GIF).decode()
    with pytest.raises(InvalidRequest):
        await load_input_image(gif, config)
    with pytest.raises(InvalidRequest):
        await load_input_image("data:image/png;base64", config)


async def test_to_data_uri_round_trips() -> None:
    image = probe_image(WEBP, max_pixels=10**6)
    uri = to_data_uri(image)
    assert uri.startswith("data:image/webp;base64,")
    again = await load_input_image(uri, Settings(_env_file=None))
    assert again == image


@pytest.mark.parametrize("query", ["", "?declared=1"])
async def test_too_many_bytes(origin: Origin, query: str) -> None:
    config = settings(origin, max_input_bytes=BIG_BYTES // 5)
    with pytest.raises(PayloadTooLarge) as caught:
        await load_input_image(f"{origin.url}/big{query}", config)
    assert caught.value.status_code == 413 and caught.value.param == "image_url"


async def test_just_under_the_byte_limit(origin: Origin) -> None:
    config = settings(origin, max_input_bytes=len(PNG))
    assert (await load_input_image(f"{origin.url}/img/png", config)).data == PNG
    with pytest.raises(PayloadTooLarge):
        await load_input_image(f"{origin.url}/img/png", settings(origin, max_input_bytes=100))


async def test_too_large_data_uri(origin: Origin) -> None:
    config = settings(origin, max_input_bytes=100)
    with pytest.raises(PayloadTooLarge):
        await load_input_image("data:image/png;base64," + base64.b64encode(PNG).decode(), config)


async def test_too_many_pixels(origin: Origin) -> None:
    config = settings(origin, max_input_megapixels=Decimal("0.1"))  # 400x300 = 0.12 MP
    with pytest.raises(PayloadTooLarge) as caught:
        await load_input_image(f"{origin.url}/img/large", config)
    assert "400x300" in caught.value.message
    roomy = settings(origin, max_input_megapixels=Decimal("0.12"))
    assert (await load_input_image(f"{origin.url}/img/large", roomy)).pixels == 120_000


@pytest.mark.parametrize("name", ["bomb", "bomb-mid"])
@pytest.mark.parametrize("limit", [Decimal("16"), Decimal("100000")])
async def test_decompression_bombs_are_413_whatever_the_limit(
    origin: Origin, name: str, limit: Decimal
) -> None:
    """A tiny file declaring 10^8 or 10^10 pixels is refused from its header alone; above
    Pillow's own bomb threshold that is Pillow's error, mapped to 413 too (never a 500)."""
    config = settings(origin, max_input_megapixels=limit)
    with pytest.raises(PayloadTooLarge):
        await load_input_image(f"{origin.url}/img/{name}", config)
    # As in production, where Pillow's bomb *warning* is not an error by default.
    with warnings.catch_warnings(), pytest.raises(PayloadTooLarge):
        warnings.simplefilter("ignore")
        await load_input_image(f"{origin.url}/img/{name}", config)
    uri = "data:image/png;base64," + base64.b64encode(png_declaring(100_000, 100_000)).decode()
    with pytest.raises(PayloadTooLarge):
        await load_input_image(uri, config)


@pytest.mark.parametrize(("path", "message"), [("/missing", "HTTP 404"), ("/slow", "Timed out")])
async def test_unfetchable(origin: Origin, path: str, message: str) -> None:
    config = settings(origin, image_fetch_timeout_s=0.3)
    with pytest.raises(InvalidRequest, match=message):
        await load_input_image(f"{origin.url}{path}", config)


async def test_a_dripping_server_hits_the_overall_deadline(origin: Origin) -> None:
    config = settings(origin, image_fetch_timeout_s=0.3)
    with pytest.raises(InvalidRequest, match="Timed out"):
        await load_input_image(f"{origin.url}/drip", config)


def test_probe_reads_only_the_header() -> None:
    image = probe_image(encode(picture(7, 5), "JPEG"), max_pixels=35)
    assert (image.width, image.height) == (7, 5)
    with pytest.raises(PayloadTooLarge):
        probe_image(encode(picture(7, 5), "JPEG"), max_pixels=34)
    with pytest.raises(InvalidRequest):
        probe_image(b"", max_pixels=100)
