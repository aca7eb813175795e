"""The metered request path end to end: gateway process -> sandbox over real HTTP."""

from __future__ import annotations

import base64
import io
import math
from fractions import Fraction
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.conftest import Gateway, GatewayFactory, Sandbox


def _png_data_uri(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _micro(usd: str) -> int:
    whole, frac = usd.split(".")
    return int(whole) * 1_000_000 + int(frac)


def _expected(pixels: int, usd_per_mp: str) -> int:
    return math.ceil(Fraction(pixels) * Fraction(usd_per_mp))


def _fetch_image(url: str) -> Image.Image:
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200
    return Image.open(io.BytesIO(response.content))


@pytest.fixture(scope="module")
def key(gateway: Gateway) -> str:
    return gateway.create_key(name="generate", budget_usd="100")[1]


def test_generate_returns_real_images_and_charges_exactly(
    gateway: Gateway, key: str, clean_sandbox: Sandbox
) -> None:
    with gateway.client(key) as client:
        response = client.post(
            "/v1/generate",
            json={"prompt": "a red fox", "num_images": 2, "image_size": "portrait_16_9",
                  "output_format": "png"},
        )  # fmt: skip
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["images"]) == 2
    for item in body["images"]:
        assert (item["width"], item["height"]) == (576, 1024)
        assert item["content_type"] == "image/png"
        image = _fetch_image(item["url"])
        assert image.size == (576, 1024) and image.format == "PNG"
    amount = _expected(2 * 576 * 1024, "0.015")
    assert _micro(body["cost"]["amount_usd"]) == amount
    assert body["cost"]["megapixels"] == 2 * 576 * 1024 / 1e6
    assert body["prompt"] == "a red fox" and isinstance(body["seed"], int)
    assert _micro(response.headers["x-cost-usd"]) == amount
    assert response.headers["x-request-id"].startswith("req_") or response.headers["x-request-id"]
    assert "ratelimit-limit" in response.headers and "ratelimit-remaining" in response.headers
    remaining = _micro(response.headers["x-budget-remaining-usd"])
    with gateway.client(key) as client:
        usage = client.get("/v1/usage").json()
    assert _micro(usage["remaining_usd"]) == remaining
    assert usage["held_usd"] == "0.000000"


def test_unlimited_key_has_no_budget_header(gateway: Gateway, api_key: str) -> None:
    with gateway.client(api_key) as client:
        response = client.post("/v1/generate", json={"prompt": "x", "image_size": "square"})
    assert response.status_code == 200
    assert "x-budget-remaining-usd" not in response.headers
    assert response.headers["x-cost-usd"] == "0.003933"  # 262144 px x 0.015 = 3932.16 -> 3933


def test_big_seed_round_trips_losslessly(gateway: Gateway, api_key: str) -> None:
    seed = 2**64 - 3
    with gateway.client(api_key) as client:
        response = client.post("/v1/run/flux-schnell", json={"prompt": "x", "seed": seed})
    assert response.status_code == 200
    assert f'"seed":{seed}' in response.text.replace(" ", "")
    assert response.json()["seed"] == seed


@pytest.mark.parametrize("model", ["fal-ai/flux/dev", "flux-schnell", "flux-pro", "sdxl"])
def test_every_model_runs(gateway: Gateway, api_key: str, model: str) -> None:
    with gateway.client(api_key) as client:
        response = client.post(
            f"/v1/run/{model}",
            json={
                "prompt": "x",
                "image_size": {"width": 320, "height": 200},
                "output_format": "png",
            },
        )
    assert response.status_code == 200, response.text
    image = response.json()["images"][0]
    assert (image["width"], image["height"]) == (320, 200)
    assert _fetch_image(image["url"]).format == "PNG"  # sdxl got `format`, not `output_format`


def test_transform_fits_input_and_charges_output(gateway: Gateway, api_key: str) -> None:
    with gateway.client(api_key) as client:
        response = client.post(
            "/v1/transform",
            json={"image_url": _png_data_uri(300, 500), "prompt": "winter", "image_size": "square"},
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert [(i["width"], i["height"]) for i in body["images"]] == [(512, 512)]
    assert _fetch_image(body["images"][0]["url"]).size == (512, 512)
    assert _micro(body["cost"]["amount_usd"]) == _expected(512 * 512, "0.045")


def test_upscale_a_generated_image(gateway: Gateway, api_key: str) -> None:
    with gateway.client(api_key) as client:
        generated = client.post("/v1/generate", json={"prompt": "x", "image_size": "square"})
        url = generated.json()["images"][0]["url"]
        price = client.post("/v1/upscale/price", json={"image_url": url, "scale": 4})
        response = client.post("/v1/upscale", json={"image_url": url, "scale": 4})
    assert price.status_code == 200, price.text
    assert response.status_code == 200, response.text
    body = response.json()
    # topaz answers without width/height; the gateway fills them in.
    assert (body["image"]["width"], body["image"]["height"]) == (2048, 2048)
    assert _fetch_image(body["image"]["url"]).size == (2048, 2048)
    expected = _expected(2048 * 2048, "0.03")
    assert _micro(body["cost"]["amount_usd"]) == expected == _micro(price.json()["amount_usd"])


@pytest.mark.parametrize("model", ["esrgan", "clarity"])
def test_other_upscalers(gateway: Gateway, api_key: str, model: str) -> None:
    with gateway.client(api_key) as client:
        response = client.post(
            "/v1/upscale", json={"image_url": _png_data_uri(100, 60), "model": model}
        )
    assert response.status_code == 200, response.text
    image = response.json()["image"]
    assert (image["width"], image["height"]) == (200, 120)


def test_upscale_output_limit_is_413(gateway: Gateway, api_key: str) -> None:
    with gateway.client(api_key) as client:
        response = client.post(
            "/v1/upscale/price", json={"image_url": _png_data_uri(4000, 2100), "scale": 4}
        )
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "payload_too_large"


def test_private_image_urls_are_refused(gateway: Gateway, api_key: str) -> None:
    with gateway.client(api_key) as client:
        for url in ("http://127.0.0.1:1/x.png", "http://10.0.0.1/x.png", "http://[::1]/x.png",
                    "http://169.254.169.254/latest/meta-data"):  # fmt: skip
            response = client.post("/v1/upscale", json={"image_url": url})
            assert response.status_code == 400, (url, response.text)
            assert response.json()["error"]["param"] == "image_url"


def test_sync_mode(gateways: GatewayFactory) -> None:
    gateway = gateways.start(FALGATE_UPSTREAM_MODE="sync")
    _, secret = gateway.create_key(name="sync")
    with gateway.client(secret) as client:
        response = client.post("/v1/generate", json={"prompt": "x", "num_images": 3})
    assert response.status_code == 200, response.text
    assert len(response.json()["images"]) == 3
    assert response.headers["x-cost-usd"] == "0.035390"  # 3 x 786432 x 0.015 = 35389.44
    gateway.stop()


def _faulted(sandbox: Sandbox, **fault: Any) -> None:
    sandbox.configure(**fault)
