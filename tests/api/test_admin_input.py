"""Admin input is as strict as client input: over HTTP, and through ``falgate keys``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, Gateway

FUTURE = (datetime.now(UTC) + timedelta(days=30)).isoformat()


def _create(gateway: Gateway, body: dict[str, Any]) -> httpx.Response:
    with gateway.admin() as admin:
        return admin.post("/admin/keys", json=body)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"name": "a\u0000\u001b[31mred"}, "name"),
        ({"name": "line\nbreak"}, "name"),
        ({"name": "x" * 201}, "name"),
        ({"name": ""}, "name"),
        ({"name": 5}, "name"),
        ({"name": "t", "rpm": True}, "rpm"),
        ({"name": "t", "rpm": "60"}, "rpm"),
        ({"name": "t", "rpm": 1.5}, "rpm"),
        ({"name": "t", "max_concurrent": "5"}, "max_concurrent"),
        ({"name": "t", "max_concurrent": False}, "max_concurrent"),
        ({"name": "t", "budget_usd": True}, "budget_usd"),
        ({"name": "t", "expires_at": 0}, "expires_at"),
        ({"name": "t", "expires_at": "1970-01-01T00:00:00Z"}, "expires_at"),
        ({"name": "t", "expires_at": "2001-05-01"}, "expires_at"),
        ({"name": "t", "models": ["no-such-model"]}, "models"),
        ({"name": "t", "models": [5]}, "models"),
        ({"name": "t", "budget_period": None}, "budget_period"),
    ],
)
def test_lax_admin_input_is_a_400_naming_the_field(
    gateway: Gateway, body: dict[str, Any], param: str
) -> None:
    response = _create(gateway, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request"
    assert error["param"] is not None and error["param"].split(".")[0] == param, error


def test_the_issue_body_is_refused(gateway: Gateway) -> None:
    body = {"name": "a\u0000\u001b[31mred", "rpm": True, "max_concurrent": "5", "expires_at": 0}
    assert _create(gateway, body).status_code == 400


def test_integer_valued_numbers_and_future_times_are_accepted(gateway: Gateway) -> None:
    response = _create(
        gateway,
        {
            "name": "Équipe données 🚀",
            "rpm": 60.0,
            "max_concurrent": 5,
            "budget_usd": "12.5",
            "expires_at": FUTURE,
        },
    )
    assert response.status_code == 201, response.text
    key = response.json()
    assert (key["rpm"], key["max_concurrent"], key["budget_usd"]) == (60, 5, "12.500000")
    assert key["status"] == "active"
    assert key["budget_period"] == "monthly"  # a budget with no period: SPEC's default


def test_model_aliases_are_stored_as_catalog_ids_and_enforced(gateway: Gateway) -> None:
    response = _create(gateway, {"name": "aliases", "models": ["flux-schnell", "fal-ai/flux/dev"]})
    assert response.status_code == 201, response.text
    assert response.json()["models"] == ["fal-ai/flux/dev", "fal-ai/flux/schnell"]
    key = response.json()["key"]
    with gateway.client(key) as client:
        allowed = client.post("/v1/generate/price", json={"prompt": "x", "model": "flux-schnell"})
        refused = client.post("/v1/generate/price", json={"prompt": "x", "model": "flux-pro"})
    assert allowed.status_code == 200, allowed.text
    assert refused.status_code == 403, refused.text

    key_id = response.json()["id"]
    with gateway.admin() as admin:
        updated = admin.patch(f"/admin/keys/{key_id}", json={"models": ["sdxl"]})
        assert updated.status_code == 200, updated.text
        assert updated.json()["models"] == ["fal-ai/stable-diffusion-xl"]
        unknown = admin.patch(f"/admin/keys/{key_id}", json={"models": ["flux-ultra"]})
    assert unknown.status_code == 400
    assert unknown.json()["error"]["param"] == "models"
    assert "flux-ultra" in unknown.json()["error"]["message"]


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"rpm": True}, "rpm"),
        ({"max_concurrent": "3"}, "max_concurrent"),
        ({"name": None}, "name"),
        ({"name": "bell\u0007"}, "name"),
        ({"budget_period": None}, "budget_period"),
        ({"expires_at": "2000-01-01T00:00:00Z"}, "expires_at"),
    ],
)
def test_updates_are_as_strict(gateway: Gateway, patch: dict[str, Any], param: str) -> None:
    key_id, _ = gateway.create_key(name="patched")
    with gateway.admin() as admin:
        response = admin.patch(f"/admin/keys/{key_id}", json=patch)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"].split(".")[0] == param


def test_a_key_without_a_stored_period_is_shown_as_enforced(
    gateway: Gateway, redis_url: str
) -> None:
    """A record with no period (written before periods existed) is shown as it is enforced."""
    import redis

    key_id, key = gateway.create_key(name="legacy", budget_usd="5")
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    with client:
        client.hset(f"{{k:{key_id}}}:meta", "budget_period", "")
    with gateway.admin() as admin:
        shown = admin.get(f"/admin/keys/{key_id}").json()["budget_period"]
    with gateway.client(key) as c:
        usage = c.get("/v1/usage").json()
    assert shown == usage["period"] == "monthly"


def _cli(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FALGATE_REDIS_URL": redis_url}
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_keys_are_as_strict(redis_url: str) -> None:
    bad_name = _cli(redis_url, "keys", "create", "--name", "a\x1b[31mred")
    assert bad_name.returncode != 0 and "name" in bad_name.stderr
    past = _cli(redis_url, "keys", "create", "--name", "t", "--expires-at", "1970-01-01")
    assert past.returncode != 0 and "future" in past.stderr
    unknown = _cli(redis_url, "keys", "create", "--name", "t", "--models", "nope")
    assert unknown.returncode != 0 and "nope" in unknown.stderr

    made = _cli(redis_url, "keys", "create", "--name", "cli", "--budget", "5", "--models", "sdxl")
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)
    assert key["models"] == ["fal-ai/stable-diffusion-xl"]
    assert key["budget_period"] == "monthly"
    updated = _cli(redis_url, "keys", "update", key["id"], "--models", "flux-dev,flux-pro")
    assert updated.returncode == 0, updated.stderr
    assert json.loads(updated.stdout)["models"] == ["fal-ai/flux-pro", "fal-ai/flux/dev"]
