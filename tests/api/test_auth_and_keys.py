"""Keys and authentication over HTTP (SPEC sections 2 and 8)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import httpx

from tests.conftest import ADMIN_TOKEN, Gateway

PRICE = "/v1/generate/price"
BODY = {"prompt": "a red fox"}


def _error(response: httpx.Response, status: int, type_: str) -> dict[str, object]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == type_
    assert error["request_id"] == response.headers["x-request-id"]
    return dict(error)


def test_three_header_forms(gateway: Gateway) -> None:
    _, secret = gateway.create_key(name="headers")
    for headers in (
        {"Authorization": f"Bearer {secret}"},
        {"Authorization": f"Key {secret}"},
        {"authorization": f"bearer {secret}"},
        {"X-API-Key": secret},
    ):
        response = httpx.post(gateway.url + PRICE, json=BODY, headers=headers)
        assert response.status_code == 200, (headers, response.text)


def test_missing_unknown_and_malformed_keys_are_401(gateway: Gateway) -> None:
    with gateway.client() as client:
        _error(client.post(PRICE, json=BODY), 401, "unauthorized")
        for value in ("Bearer fgk_nope", "Bearer", "Basic abc", "Key", "Bearer " + "x" * 5000):
            response = client.post(PRICE, json=BODY, headers={"Authorization": value})
            _error(response, 401, "unauthorized")
        _error(client.post(PRICE, json=BODY, headers={"X-API-Key": "nope"}), 401, "unauthorized")


def test_admin_token_is_not_a_client_key_and_vice_versa(gateway: Gateway) -> None:
    _, secret = gateway.create_key(name="separate")
    with gateway.client(ADMIN_TOKEN) as client:
        _error(client.post(PRICE, json=BODY), 401, "unauthorized")
    with gateway.client(secret) as client:
        _error(client.get("/admin/keys"), 401, "unauthorized")
    with gateway.client() as client:
        _error(client.get("/admin/keys"), 401, "unauthorized")
        _error(
            client.get("/admin/keys", headers={"Authorization": "Bearer wrong"}),
            401,
            "unauthorized",
        )


def test_key_lifecycle(gateway: Gateway) -> None:
    with gateway.admin() as admin:
        created = admin.post(
            "/admin/keys",
            json={"name": "team-a", "budget_usd": "50", "budget_period": "daily", "rpm": 60},
        )
        assert created.status_code == 201
        body = created.json()
        secret, key_id = body["key"], body["id"]
        assert secret.startswith("fgk_") and len(secret) >= 4 + 43
        assert body["budget_usd"] == "50.000000" and body["budget_period"] == "daily"
        assert body["rpm"] == 60 and body["status"] == "active"
        assert secret.startswith(body["prefix"])

        shown = admin.get(f"/admin/keys/{key_id}").json()
        assert "key" not in shown and shown["name"] == "team-a"
        listed = admin.get("/admin/keys").json()["keys"]
        assert key_id in {k["id"] for k in listed}
        assert all("key" not in k for k in listed)
        assert secret not in admin.get("/admin/keys").text

        patched = admin.patch(f"/admin/keys/{key_id}", json={"budget_usd": None, "rpm": 120})
        assert patched.status_code == 200
        assert patched.json()["budget_usd"] is None and patched.json()["rpm"] == 120

        with gateway.client(secret) as client:
            assert client.post(PRICE, json=BODY).status_code == 200
        revoked = admin.delete(f"/admin/keys/{key_id}")
        assert revoked.status_code == 200 and revoked.json()["status"] == "revoked"
        assert admin.get(f"/admin/keys/{key_id}").json()["status"] == "revoked"
        with gateway.client(secret) as client:
            _error(client.post(PRICE, json=BODY), 401, "unauthorized")

        _error(admin.get("/admin/keys/key_doesnotexist"), 404, "not_found")
        _error(admin.patch("/admin/keys/key_doesnotexist", json={"rpm": 1}), 404, "not_found")
        _error(admin.delete("/admin/keys/key_doesnotexist"), 404, "not_found")


def test_admin_validation(gateway: Gateway) -> None:
    with gateway.admin() as admin:
        for body, param in (
            ({}, "name"),
            ({"name": ""}, "name"),
            ({"name": "x", "budget_usd": "-1"}, "budget_usd"),
            ({"name": "x", "budget_usd": "0.0000001"}, "budget_usd"),
            ({"name": "x", "budget_period": "weekly"}, "budget_period"),
            ({"name": "x", "rpm": 0}, "rpm"),
            ({"name": "x", "models": ["no/such-model"]}, "models"),
            ({"name": "x", "colour": "red"}, "colour"),
        ):
            error = _error(admin.post("/admin/keys", json=body), 400, "invalid_request")
            assert error["param"] == param, (body, error)


def test_expired_key_is_401(gateway: Gateway) -> None:
    # An expiry must be in the future when it is set (a past one is a 400): let one pass.
    expiry = datetime.now(UTC) + timedelta(seconds=1)
    key_id, secret = gateway.create_key(name="old", expires_at=expiry.isoformat())
    while datetime.now(UTC) <= expiry + timedelta(milliseconds=50):
        time.sleep(0.05)
    with gateway.client(secret) as client:
        error = _error(client.post(PRICE, json=BODY), 401, "unauthorized")
        assert "expired" in str(error["message"])
    with gateway.admin() as admin:
        assert admin.get(f"/admin/keys/{key_id}").json()["status"] == "expired"


def test_model_allow_list_is_403(gateway: Gateway) -> None:
    _, secret = gateway.create_key(name="schnell-only", models=["fal-ai/flux/schnell"])
    with gateway.client(secret) as client:
        assert client.post(PRICE, json={**BODY, "model": "flux-schnell"}).status_code == 200
        error = _error(client.post(PRICE, json=BODY), 403, "forbidden")
        assert error["param"] == "model"
        _error(client.post("/v1/run/fal-ai/flux/dev", json=BODY), 403, "forbidden")
        models = {m["id"]: m["allowed"] for m in client.get("/v1/models").json()["models"]}
        assert models["fal-ai/flux/schnell"] is True and models["fal-ai/flux/dev"] is False


def test_cli_keys(gateway: Gateway, redis_url: str) -> None:
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "FALGATE_REDIS_URL": redis_url}

    def cli(*args: str) -> object:
        out = subprocess.run(
            [sys.executable, "-m", "app.cli", "keys", *args],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        return json.loads(out.stdout)

    created = cli("create", "--name", "team-cli", "--budget", "50", "--period", "monthly",
                  "--rpm", "60")  # fmt: skip
    assert isinstance(created, dict)
    key_id, secret = created["id"], created["key"]
    assert created["budget_usd"] == "50.000000" and created["rpm"] == 60
    with gateway.client(secret) as client:
        assert client.post(PRICE, json=BODY).status_code == 200
    updated = cli("update", key_id, "--budget", "none", "--max-concurrent", "3")
    assert isinstance(updated, dict)
    assert updated["budget_usd"] is None and updated["max_concurrent"] == 3
    listed = cli("list")
    assert isinstance(listed, list) and key_id in {k["id"] for k in listed}
    shown = cli("show", key_id)
    assert isinstance(shown, dict) and shown["name"] == "team-cli"
    revoked = cli("revoke", key_id)
    assert isinstance(revoked, dict) and revoked["status"] == "revoked"
    with gateway.client(secret) as client:
        assert client.post(PRICE, json=BODY).status_code == 401
