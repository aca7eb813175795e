"""The price routes and ``GET /v1/models`` over HTTP."""

from __future__ import annotations

import math
import re
from fractions import Fraction

import httpx
import pytest

from tests.conftest import Gateway


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> httpx.Client:
    _, secret = gateway.create_key(name="prices")
    return gateway.client(secret)


def test_spec_price_example(client: httpx.Client) -> None:
    response = client.post("/v1/generate/price", json={"prompt": "a fox"})
    assert response.status_code == 200
    assert response.json() == {
        "price": "$0.012",
        "currency": "USD",
        "amount_usd": "0.011797",
        "megapixels": 0.786432,
        "model": "fal-ai/flux/dev",
        "unit_price_usd_per_mp": "0.015000",
    }


@pytest.mark.parametrize(
    ("path", "body", "amount"),
    [
        ("/v1/run/flux-schnell/price", {"image_size": "square_hd", "num_images": 4}, 4 * 1048576 * Fraction("0.004")),
        ("/v1/run/fal-ai/flux-pro/price", {"image_size": {"width": 1000, "height": 1000}}, 1000000 * Fraction("0.04")),
        ("/v1/run/sdxl/price", {"image_size": "portrait_16_9", "num_images": 3}, 3 * 589824 * Fraction("0.007")),
        ("/v1/transform/price", {"image_url": "https://example.com/x.png", "image_size": "square", "num_images": 2}, 2 * 262144 * Fraction("0.045")),
    ],
)  # fmt: skip
def test_price_routes(
    client: httpx.Client, path: str, body: dict[str, object], amount: Fraction
) -> None:
    response = client.post(path, json={"prompt": "p", **body})
    assert response.status_code == 200, response.text
    micro = math.ceil(amount)
    assert response.json()["amount_usd"] == f"{micro // 1_000_000}.{micro % 1_000_000:06d}"


def test_models_route(client: httpx.Client) -> None:
    response = client.get("/v1/models")
    assert response.status_code == 200
    models = {m["id"]: m for m in response.json()["models"]}
    assert set(models) >= {
        "fal-ai/flux/dev", "fal-ai/flux/schnell", "fal-ai/flux-pro",
        "fal-ai/stable-diffusion-xl", "topaz", "esrgan", "clarity",
    }  # fmt: skip
    dev = models["fal-ai/flux/dev"]
    assert dev["alias"] == "flux-dev"
    assert dev["operations"] == ["generate", "transform"]
    assert dev["unit_price_usd_per_mp"] == {"generate": "0.015000", "transform": "0.045000"}
    assert dev["limits"]["num_inference_steps"] == [1, 50]
    pro = models["fal-ai/flux-pro"]
    assert "num_inference_steps" in pro["ignored_params"]["generate"]
    assert models["topaz"]["unit_price_usd_per_mp"] == {"upscale": "0.030000"}
    assert models["topaz"]["upstream"] == {"upscale": "fal-ai/topaz/upscale/image"}


def test_openapi_document(gateway: Gateway) -> None:
    from openapi_spec_validator import validate

    doc = httpx.get(gateway.url + "/openapi.json").json()
    validate(doc)  # a valid OpenAPI 3.1 document, so client generators accept it
    assert "HTTPValidationError" not in httpx.get(gateway.url + "/openapi.json").text
    ops = {
        op["operationId"]
        for path in doc["paths"].values()
        for op in path.values()
        if isinstance(op, dict) and "operationId" in op
    }
    assert ops >= {
        "run", "priceRun", "generate", "priceGenerate", "transform", "priceTransform",
        "upscale", "priceUpscale", "listModels", "getUsage", "createKey", "listKeys",
        "getKey", "updateKey", "revokeKey", "getUsageReport", "exportLedger",
        "getHealth", "getReadiness", "getMetrics",
    }  # fmt: skip
    # Every operation documents its errors with the envelope.
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if path.startswith(("/v1/", "/admin/")):
                errors = [c for c in op["responses"] if c.startswith(("4", "5"))]
                assert errors, (method, path)
                for code in errors:
                    ref = op["responses"][code]["content"]["application/json"]["schema"]["$ref"]
                    assert ref.endswith("/ErrorEnvelope"), (method, path, code)
    generate = doc["paths"]["/v1/generate"]["post"]
    assert "402" in generate["responses"] and "429" in generate["responses"]
    schemas = doc["components"]["schemas"]
    assert {"GenerateRequest", "GenerateResponse", "ErrorEnvelope", "PriceResponse"} <= set(schemas)
    assert schemas["GenerateRequest"]["additionalProperties"] is False
    assert schemas["GenerateRequest"].get("examples")


def test_documented_security_is_what_each_route_enforces(gateway: Gateway) -> None:
    """Every operation the document says needs credentials refuses a request without any, and
    every /v1, /fal and /admin operation says which it takes."""
    doc = httpx.get(gateway.url + "/openapi.json").json()
    assert {"HTTPBearer", "APIKeyHeader", "SapiomTransaction", "AdminToken"} <= set(
        doc["components"]["securitySchemes"]
    )
    key_schemes = {"HTTPBearer", "APIKeyHeader", "SapiomTransaction"}
    secured = 0
    for path, item in doc["paths"].items():
        for method, op in item.items():
            names = {name for option in op.get("security", []) for name in option}
            url = gateway.url + re.sub(r"\{(\w+)\}", "x", path).replace(
                "/run/x", "/run/fal-ai/flux/dev"
            )
            if names:
                secured += 1
                response = httpx.request(method.upper(), url, json={})
                assert response.status_code == 401, (method, path, response.status_code)
                if path.startswith("/admin/"):
                    assert names == {"AdminToken"}, (method, path)
                elif not path.startswith(("/v1/transactions", "/v1/auth/", "/fal/proxy")):
                    assert names == key_schemes, (method, path)
            else:
                assert not path.startswith(("/v1/", "/admin/", "/fal/")), (method, path)
    assert secured >= 18
