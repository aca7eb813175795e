"""Every field rule of SPEC section 3 answers 400 naming the field; nothing answers 500."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.conftest import Gateway

GOOD = {"prompt": "a red fox"}


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> httpx.Client:
    _, secret = gateway.create_key(name="validation")
    return gateway.client(secret)


def _bad(response: httpx.Response, param: str | None, status: int = 400) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request"
    assert error["param"] == param, error
    assert error["message"]


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   \n\t"}, "prompt"),
        ({"prompt": "x" * 10_001}, "prompt"),
        ({"prompt": 42}, "prompt"),
        ({"prompt": None}, "prompt"),
        ({"image_size": "huge"}, "image_size"),
        ({"image_size": {"width": 63, "height": 512}}, "image_size.width"),
        ({"image_size": {"width": 512, "height": 4097}}, "image_size.height"),
        ({"image_size": {"width": 4096, "height": 4096}}, "image_size"),  # over 4.2 MP
        ({"image_size": {"width": 512}}, "image_size.height"),
        ({"image_size": {"width": 512, "height": 512, "depth": 3}}, "image_size.depth"),
        ({"image_size": {"width": "512", "height": 512}}, "image_size.width"),
        ({"num_images": 0}, "num_images"),
        ({"num_images": 5}, "num_images"),
        ({"num_images": "2"}, "num_images"),
        ({"num_images": 1.5}, "num_images"),
        ({"num_images": True}, "num_images"),
        ({"num_images": 10**30}, "num_images"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"num_inference_steps": 101}, "num_inference_steps"),
        ({"num_inference_steps": 51}, "num_inference_steps"),  # flux dev's own limit is 50
        ({"guidance_scale": -0.1}, "guidance_scale"),
        ({"guidance_scale": 20.5}, "guidance_scale"),
        ({"guidance_scale": "3"}, "guidance_scale"),
        ({"output_format": "webp"}, "output_format"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"seed": "7"}, "seed"),
        ({"colour": "red"}, "colour"),
        ({"model": 7}, "model"),
    ],
)
def test_generate_field_rules(client: httpx.Client, patch: dict[str, Any], param: str) -> None:
    _bad(client.post("/v1/generate/price", json={**GOOD, **patch}), param)
    _bad(client.post("/v1/generate", json={**GOOD, **patch}), param)


def test_schnell_steps_limit_from_catalog(client: httpx.Client) -> None:
    body = {**GOOD, "model": "flux-schnell", "num_inference_steps": 13}
    _bad(client.post("/v1/generate/price", json=body), "num_inference_steps")
    body["num_inference_steps"] = 12
    assert client.post("/v1/generate/price", json=body).status_code == 200


def test_limits_that_are_allowed(client: httpx.Client) -> None:
    for patch in (
        {"seed": 0},
        {"seed": 2**64 - 1},
        {"image_size": {"width": 64, "height": 64}},
        {"image_size": {"width": 2048, "height": 2048}},
        {"num_images": 4, "num_inference_steps": 50, "guidance_scale": 20},
        {"guidance_scale": 0},
        {"prompt": "日本語のプロンプト 🦊 " * 100},
        {"model": "flux-pro", "num_inference_steps": 90},  # accepted, not forwarded
    ):
        response = client.post("/v1/generate/price", json={**GOOD, **patch})
        assert response.status_code == 200, (patch, response.text)


def test_run_route_model_must_agree(client: httpx.Client) -> None:
    ok = client.post("/v1/run/flux-dev/price", json={**GOOD, "model": "fal-ai/flux/dev"})
    assert ok.status_code == 200
    _bad(client.post("/v1/run/flux-dev/price", json={**GOOD, "model": "flux-schnell"}), "model")
    response = client.post("/v1/run/fal-ai/no-such/price", json=GOOD)
    assert response.status_code == 404 and response.json()["error"]["type"] == "model_not_found"
    response = client.post("/v1/generate/price", json={**GOOD, "model": "nope"})
    assert response.status_code == 404 and response.json()["error"]["param"] == "model"


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"image_url": "ftp://example.com/a.png"}, "image_url"),
        ({"image_url": "file:///etc/passwd"}, "image_url"),
        ({"image_url": 7}, "image_url"),
        ({"strength": 1.5}, "strength"),
        ({"strength": -0.1}, "strength"),
        ({"guidance_scale": 3.5}, "guidance_scale"),
        ({"model": "flux-schnell"}, "model"),
    ],
)
def test_transform_field_rules(client: httpx.Client, patch: dict[str, Any], param: str) -> None:
    body = {"image_url": "https://example.com/a.png", "prompt": "winter", **patch}
    _bad(client.post("/v1/transform/price", json=body), param)


def test_transform_requires_image_url(client: httpx.Client) -> None:
    _bad(client.post("/v1/transform/price", json={"prompt": "x"}), "image_url")


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"scale": 3}, "scale"),
        ({"scale": "2"}, "scale"),
        ({"output_format": "gif"}, "output_format"),
        ({"prompt": "no prompts here"}, "prompt"),
    ],
)
def test_upscale_field_rules(client: httpx.Client, patch: dict[str, Any], param: str) -> None:
    body = {"image_url": "https://example.com/a.png", **patch}
    _bad(client.post("/v1/upscale/price", json=body), param)


def test_unknown_upscaler_is_404(client: httpx.Client) -> None:
    body = {"image_url": "data:image/png;base64,AAAA", "model": "waifu2x"}
    response = client.post("/v1/upscale/price", json=body)
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "model_not_found"


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"{",
        b"[]",
        b"null",
        b"42",
        b'"a string"',
        b'{"prompt": "x", "num_images": 1e400}',
        b'{"prompt": "x", "num_images": NaN}',
        b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}",
        b'{"prompt": "x", "guidance_scale": ' + b"9" * 5000 + b"}",
        b'{"prompt": "\xff\xfe"}',
        b'{"prompt": "\\ud800"}',
        ('{"prompt": "x", "image_size": ' + _deep(100_000) + "}").encode(),
        ('{"prompt": ' + _deep(10_000) + "}").encode(),
        b'{"prompt": "x", "prompt": "y", "extra": {"a": [1, 2, {"b": null}]}}',
        json.dumps({"prompt": {"$gt": ""}}).encode(),
    ],
)
def test_malformed_bodies_never_500(client: httpx.Client, raw: bytes) -> None:
    for path in ("/v1/generate", "/v1/generate/price", "/v1/transform", "/v1/upscale/price",
                 "/v1/run/flux-dev"):  # fmt: skip
        response = client.post(path, content=raw, headers={"Content-Type": "application/json"})
        assert 400 <= response.status_code < 500, (path, raw[:60], response.text[:300])
        error = response.json()["error"]
        assert error["type"] in ("invalid_request", "payload_too_large")
        assert "Traceback" not in response.text


def test_wrong_content_type_and_methods(client: httpx.Client) -> None:
    response = client.post("/v1/generate", content=b"prompt=x",
                           headers={"Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
    assert response.status_code == 400
    response = client.get("/v1/generate")
    assert response.status_code == 405 and response.json()["error"]["type"] == "invalid_request"
    response = client.get("/v1/nothing-here")
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found"


def test_body_over_limit_is_413(gateways: Any) -> None:
    gateway = gateways.start(FALGATE_MAX_BODY_BYTES="1000")
    _, secret = gateway.create_key(name="small-bodies")
    with gateway.client(secret) as client:
        response = client.post("/v1/generate", json={"prompt": "x" * 2000})
        assert response.status_code == 413
        assert response.json()["error"]["type"] == "payload_too_large"

        def chunks() -> Any:
            for _ in range(10):
                yield b" " * 500

        response = client.post("/v1/generate", content=chunks())
        assert response.status_code == 413
    gateway.stop()
