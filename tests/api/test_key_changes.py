"""Key changes apply on the next request on every gateway process (SPEC section 10), even with
a long authentication cache: the change is published over Redis pub/sub and every process
drops the key from its cache when it hears it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import Gateway, GatewayFactory

LONG_CACHE = {"FALGATE_AUTH_CACHE_TTL_S": "3600"}
PRICE = {"prompt": "x"}


@pytest.fixture(scope="module")
def pair(gateways: GatewayFactory) -> Iterator[tuple[Gateway, Gateway]]:
    first, second = gateways.start(**LONG_CACHE), gateways.start(**LONG_CACHE)
    yield first, second
    first.stop()
    second.stop()


def _warm(gateway: Gateway, key: str) -> None:
    """Put the key in this process's cache (by using it)."""
    with gateway.client(key) as client:
        for _ in range(3):
            assert client.post("/v1/generate/price", json=PRICE).status_code == 200


def test_revocation_applies_at_once_on_another_process(pair: tuple[Gateway, Gateway]) -> None:
    admin_side, serving = pair
    key_id, key = admin_side.create_key(name="revoke-me")
    _warm(serving, key)
    with admin_side.admin() as admin:
        assert admin.delete(f"/admin/keys/{key_id}").status_code == 200
    with serving.client(key) as client:
        price = client.post("/v1/generate/price", json=PRICE)
        usage = client.get("/v1/usage")
    assert price.status_code == 401 and "revoked" in price.json()["error"]["message"]
    assert usage.status_code == 401


def test_model_restrictions_and_budgets_apply_at_once(pair: tuple[Gateway, Gateway]) -> None:
    admin_side, serving = pair
    key_id, key = admin_side.create_key(name="restrict-me", budget_usd="5")
    _warm(serving, key)
    with admin_side.admin() as admin:
        changed = admin.patch(
            f"/admin/keys/{key_id}", json={"models": ["fal-ai/flux/schnell"], "budget_usd": "7"}
        )
    assert changed.status_code == 200, changed.text
    with serving.client(key) as client:
        refused = client.post("/v1/generate/price", json=PRICE)  # flux-dev by default
        allowed = client.post("/v1/generate/price", json={**PRICE, "model": "flux-schnell"})
        usage = client.get("/v1/usage").json()
    assert refused.status_code == 403
    assert allowed.status_code == 200
    assert usage["budget_usd"] == "7.000000"
