"""The disagreements issue 13 found between ``/openapi.json`` and the server, one by one.

Schemathesis (test_schemathesis.py) searches for such disagreements at large; these tests pin
each one found so far, in the document and in the server's answer.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from app.errors import ERROR_TYPES
from tests.conftest import Gateway

PRICE = "/v1/generate/price"
Doc = dict[str, Any]


@pytest.fixture(scope="module")
def doc(contract_gateway: Gateway) -> Doc:
    document: Doc = httpx.get(f"{contract_gateway.url}/openapi.json", timeout=10).json()
    return document


@pytest.fixture(scope="module")
def key(contract_gateway: Gateway) -> str:
    return contract_gateway.create_key(name="contract")[1]


def _operations(doc: Doc) -> list[tuple[str, str, Doc]]:
    return [
        (path, method, op)
        for path, item in doc["paths"].items()
        for method, op in item.items()
        if isinstance(op, dict) and "responses" in op
    ]


def _schema(doc: Doc, ref_or_schema: Doc) -> Doc:
    ref = ref_or_schema.get("$ref")
    if ref is None:
        return ref_or_schema
    schema: Doc = doc["components"]["schemas"][ref.rsplit("/", 1)[1]]
    return schema


def _error(response: httpx.Response, status: int, type_: str, param: str | None) -> Doc:
    assert response.status_code == status, response.text
    error: Doc = response.json()["error"]
    assert (error["type"], error["param"]) == (type_, param), error
    assert error["request_id"] == response.headers["X-Request-Id"]
    return error


def test_every_operation_documents_its_common_errors_and_the_request_id(doc: Doc) -> None:
    for path, method, op in _operations(doc):
        responses = op["responses"]
        expected = {"400"}
        if path.startswith(("/v1/", "/admin/")):
            expected |= {"401", "503"}
        if method != "get":
            expected |= {"408", "413"}
        assert expected <= set(responses), (method, path, sorted(responses))
        for code, response in responses.items():
            assert response["headers"]["X-Request-Id"]["required"] is True, (path, code)
            assert "X-Client-Request-Id" in response["headers"], (path, code)
            if not code.startswith(("4", "5")):
                continue
            schema = response["content"]["application/json"]["schema"]
            refs = [s.get("$ref", "") for s in schema.get("anyOf", [schema])]
            if path.startswith(("/v1/", "/admin/")):
                assert schema["$ref"].endswith("/ErrorEnvelope"), (path, code)
            elif code == "400" or (code in ("408", "413") and method != "get"):
                # The middlewares' answers (X-Request-Id, the body), on any route.
                assert any(r.endswith("/ErrorEnvelope") for r in refs), (path, code)
        names = {(p["in"], p["name"]) for p in op.get("parameters", [])}
        assert ("header", "X-Request-Id") in names, (method, path)


def test_the_error_envelope_is_typed(doc: Doc) -> None:
    detail = doc["components"]["schemas"]["ErrorDetail"]["properties"]
    assert detail["type"]["enum"] == list(ERROR_TYPES)
    assert {"rate_limited", "budget_exceeded", "model_not_found"} <= set(ERROR_TYPES)
    assert detail["limit_type"]["enum"] == ["rpm", "concurrency"]
    for amount in ("estimate_usd", "remaining_usd"):
        assert detail[amount]["type"] == "string" and detail[amount]["pattern"]


def test_headers_are_declared_where_they_are_sent(doc: Doc) -> None:
    generate = doc["paths"]["/v1/generate"]["post"]["responses"]
    ok = generate["200"]["headers"]
    assert ok["X-Cost-USD"]["required"] is True
    assert {"X-Budget-Remaining-USD", "RateLimit-Limit", "RateLimit-Remaining"} <= set(ok)
    assert ok["RateLimit-Reset"]["schema"] == {"type": "integer", "minimum": 0}
    limited = generate["429"]["headers"]
    assert limited["Retry-After"]["required"] is True and "RateLimit-Reset" in limited
    assert "RateLimit-Limit" in generate["402"]["headers"]
    assert "Retry-After" in generate["503"]["headers"]
    idempotency = next(
        p
        for p in doc["paths"]["/v1/generate"]["post"]["parameters"]
        if p["name"] == "Idempotency-Key"
    )
    assert idempotency["schema"]["maxLength"] == 255 and idempotency["schema"]["pattern"]


def test_non_json_responses_have_their_real_media_types(doc: Doc) -> None:
    ledger = doc["paths"]["/admin/ledger"]["get"]["responses"]["200"]["content"]
    assert ledger == {
        "application/x-ndjson": {"schema": {"type": "string"}},
        "text/csv": {"schema": {"type": "string"}},
    }
    metrics = doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert metrics == {"text/plain": {"schema": {"type": "string"}}}


def test_usage_rows_are_typed(doc: Doc) -> None:
    row = doc["components"]["schemas"]["UsageRow"]["properties"]
    assert row["key"]["type"] == row["model"]["type"] == "string"
    assert row["day"]["format"] == "date"


def test_integer_valued_numbers_are_integers(contract_gateway: Gateway, key: str) -> None:
    body = {"prompt": "a fox", "num_images": 2.0, "image_size": {"width": 512.0, "height": 512}}
    with contract_gateway.client(key) as client:
        price = client.post(PRICE, json=body)
        assert price.status_code == 200, price.text
        assert price.json()["megapixels"] == 0.524288
        _error(client.post(PRICE, json={"prompt": "a fox", "num_images": 2.5}), 400,
               "invalid_request", "num_images")  # fmt: skip
        _error(client.post(PRICE, json={"prompt": "a fox", "num_images": True}), 400,
               "invalid_request", "num_images")  # fmt: skip
    with contract_gateway.admin() as admin:
        created = admin.post("/admin/keys", json={"name": "floats", "rpm": 60.0, "budget_usd": 5.0})
        assert created.status_code == 201, created.text
        assert (created.json()["rpm"], created.json()["budget_usd"]) == (60, "5.000000")


def test_a_too_long_idempotency_key_names_the_header(contract_gateway: Gateway, key: str) -> None:
    with contract_gateway.client(key) as client:
        for bad in ("k" * 256, "caf\u00e9"):
            response = client.post(
                "/v1/generate",
                json={"prompt": "a fox"},
                headers={"Idempotency-Key": bad.encode("latin-1")},
            )
            error = _error(response, 400, "invalid_request", "Idempotency-Key")
            assert "Idempotency-Key" in error["message"]


def test_what_the_schema_refuses_the_server_refuses(contract_gateway: Gateway, key: str) -> None:
    with contract_gateway.client(key) as client:
        _error(client.post("/v1/upscale/price", json={"image_url": ""}), 400,
               "invalid_request", "image_url")  # fmt: skip
        _error(client.post(PRICE, json={"prompt": "   "}), 400, "invalid_request", "prompt")
    with contract_gateway.admin() as admin:
        for query in ({"from": "garbage"}, {"to": "2024-06-01T00:00:00"}, {"from": ""}):
            name = next(iter(query))
            _error(admin.get("/admin/usage", params=query), 400, "invalid_request", name)
            _error(admin.get("/admin/ledger", params=query), 400, "invalid_request", name)
        ok = admin.get("/admin/usage", params={"from": "2024-06-01", "to": "9999-12-31"})
        assert ok.status_code == 200, ok.text
        old = admin.get("/admin/ledger", params={"to": "1900-01-01T00:00:00Z"})
        assert old.status_code == 200 and old.text == "", old.text
        key_id = admin.post("/admin/keys", json={"name": "patch-me"}).json()["id"]
        for field in ("budget_period", "name"):
            _error(admin.patch(f"/admin/keys/{key_id}", json={field: None}), 400,
                   "invalid_request", field)  # fmt: skip
        for budget in ("1.0000001", "1e3", "-1", True):
            _error(admin.post("/admin/keys", json={"name": "b", "budget_usd": budget}), 400,
                   "invalid_request", "budget_usd")  # fmt: skip
        _error(admin.post("/admin/keys", json={"name": "e", "expires_at": 4102444800}), 400,
               "invalid_request", "expires_at")  # fmt: skip


def test_the_document_says_null_where_the_server_takes_null(doc: Doc) -> None:
    update = doc["components"]["schemas"]["KeyUpdate"]["properties"]
    assert (
        update["budget_period"].get("type") == "string" and "anyOf" not in update["budget_period"]
    )
    assert update["name"].get("type") == "string"
    assert {"type": "null"} in update["budget_usd"]["anyOf"]  # null clears the budget


def test_unsupported_methods_get_405_with_allow(contract_gateway: Gateway) -> None:
    with contract_gateway.admin() as admin:
        response = admin.request("PUT", "/admin/keys")
        _error(response, 405, "invalid_request", None)
        assert response.headers["Allow"] == "GET, POST"
        response = admin.request("TRACE", "/admin/keys/key_0123")
        assert response.status_code == 405
        assert response.headers["Allow"] == "DELETE, GET, PATCH"


def test_a_malformed_client_request_id_is_documented_and_refused(
    contract_gateway: Gateway, key: str
) -> None:
    with contract_gateway.client(key) as client:
        response = client.get("/v1/usage", headers={"X-Request-Id": "x" * 129})
        _error(response, 400, "invalid_request", "X-Request-Id")
        echoed = client.get("/v1/usage", headers={"X-Request-Id": "my id 7"})
        assert echoed.status_code == 200 and echoed.headers["X-Client-Request-Id"] == "my id 7"
