"""The Sapiom control plane and transaction authentication over HTTP, against ``falgate serve``.

Transactions are created as the SDK creates them (``x-api-key``, ``requestFacts.request``), and
then presented as the SDK presents them: ``X-Sapiom-Transaction-Id`` and no credentials.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import redis

from tests.conftest import Gateway, GatewayFactory, Sandbox

SQUARE = {"prompt": "a red fox", "image_size": "square"}
SQUARE_COST = 3_933  # 512 x 512 px at 0.015 USD/MP, rounded up


def facts(method: str, url: str) -> dict[str, Any]:
    """The body ``@sapiom/fetch`` 0.3.0 sends (abridged: extra fields are ignored anyway)."""
    return {
        "requestFacts": {
            "source": "http-client",
            "version": "v1",
            "sdk": {"name": "@sapiom/fetch", "version": "1.0.0"},
            "request": {
                "method": method,
                "url": url,
                "urlParsed": {},
                "headers": {"content-type": "application/json"},
                "hasBody": method != "GET",
                "clientType": "fetch",
                "timestamp": datetime.now(UTC).isoformat(),
            },
        },
        "serviceName": "tests",
        "metadata": {"preemptiveAuthorization": True},
    }


def create(gateway: Gateway, key: str, method: str, path_or_url: str) -> httpx.Response:
    url = path_or_url if "://" in path_or_url else f"{gateway.url}{path_or_url}"
    with httpx.Client(base_url=gateway.url, timeout=30) as control:
        return control.post("/v1/transactions", json=facts(method, url), headers={"x-api-key": key})


def authorized(gateway: Gateway, key: str, method: str, path_or_url: str) -> str:
    response = create(gateway, key, method, path_or_url)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["status"] == "authorized", body
    return str(body["id"])


def present(
    gateway: Gateway,
    transaction_id: str,
    method: str = "GET",
    path: str = "/v1/usage",
    key: str | None = None,
    **kwargs: Any,
) -> httpx.Response:
    headers = {"X-Sapiom-Transaction-Id": transaction_id}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    with httpx.Client(base_url=gateway.url, timeout=60) as client:
        return client.request(method, path, headers=headers, **kwargs)


def assert_unauthorized(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    error = response.json()["error"]
    assert error["type"] == "unauthorized" and error["message"] and error["request_id"]


@pytest.fixture
def store(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


def test_transaction_authenticates_one_request_as_the_creating_key(
    gateway: Gateway, store: redis.Redis
) -> None:
    key_id, key = gateway.create_key(name="sapiom-usage")
    response = create(gateway, key, "GET", "/v1/usage")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["status"] == "authorized"
    transaction_id = body["id"]
    assert transaction_id.startswith(f"stx_{key_id}_")
    # Stored under the key's hash tag, never by its id in clear, with a 5-minute lifetime.
    [stored] = store.keys(f"{{k:{key_id}}}:sapiom:tx:*")
    assert transaction_id.rsplit("_", 1)[1] not in stored
    assert 290_000 < store.pttl(stored) <= 300_000

    used = present(gateway, transaction_id)
    assert used.status_code == 200, used.text
    assert used.json()["key_id"] == key_id

    assert_unauthorized(present(gateway, transaction_id))  # single use


async def test_concurrent_presentations_of_one_transaction_admit_exactly_one(
    gateway: Gateway,
) -> None:
    key_id, key = gateway.create_key(name="sapiom-race")
    transaction_id = authorized(gateway, key, "GET", "/v1/usage")
    headers = {"X-Sapiom-Transaction-Id": transaction_id}
    async with gateway.async_client() as client:
        responses = await asyncio.gather(
            *(client.get("/v1/usage", headers=headers) for _ in range(20))
        )
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] + [401] * 19
    assert next(r for r in responses if r.status_code == 200).json()["key_id"] == key_id


def test_metered_request_with_only_a_transaction_id_is_charged_to_its_key(
    gateway: Gateway, clean_sandbox: Sandbox
) -> None:
    _, key = gateway.create_key(name="sapiom-metered", budget_usd="1")
    transaction_id = authorized(gateway, key, "POST", "/v1/generate")

    response = present(gateway, transaction_id, "POST", "/v1/generate", json=SQUARE)

    assert response.status_code == 200, response.text
    assert response.headers["X-Cost-USD"] == "0.003933"
    assert response.headers["X-Budget-Remaining-USD"] == "0.996067"
    with gateway.client(key) as client:
        assert client.get("/v1/usage").json()["spent_usd"] == "0.003933"
    [job] = clean_sandbox.requests()
    assert job["pixels"] == 512 * 512


@pytest.mark.parametrize(
    ("declared_method", "declared", "method", "path", "declared_is_servable"),
    [
        ("GET", "/v1/generate", "POST", "/v1/generate", False),  # another method
        ("GET", "/v1/models", "GET", "/v1/usage", True),  # another path
        ("GET", "/v1/usage?period=day", "GET", "/v1/usage", True),  # another query
        ("GET", "http://elsewhere.example/v1/usage", "GET", "/v1/usage", False),  # host
        ("GET", "https://127.0.0.1/v1/usage", "GET", "/v1/usage", False),  # scheme
    ],
)
def test_transaction_is_bound_to_the_method_and_url_it_authorized(
    gateway: Gateway,
    clean_sandbox: Sandbox,
    declared_method: str,
    declared: str,
    method: str,
    path: str,
    declared_is_servable: bool,
) -> None:
    _, key = gateway.create_key(name="sapiom-bound")
    transaction_id = authorized(gateway, key, declared_method, declared)

    assert_unauthorized(present(gateway, transaction_id, method, path, json=SQUARE))
    # Presenting it used it up: not even the request it authorized may follow.
    if declared_is_servable:
        assert_unauthorized(present(gateway, transaction_id, declared_method, declared))
    assert clean_sandbox.requests() == []


def test_url_comparison_follows_the_sdk_url_normalisation(gateway: Gateway) -> None:
    _, key = gateway.create_key(name="sapiom-normalised")
    upper = gateway.url.replace("http://", "HTTP://")
    transaction_id = authorized(gateway, key, "get", f"{upper}/v1/usage#fragment")
    assert present(gateway, transaction_id).status_code == 200


@pytest.mark.parametrize(
    "made_up",
    [
        "stx_key_0123456789abcdef_" + "0" * 32,
        "not-a-transaction",
        "",
        "stx_key_}{_" + "a" * 32,
        "x" * 5000,
    ],
)
def test_made_up_transaction_id_is_401(gateway: Gateway, made_up: str) -> None:
    assert_unauthorized(present(gateway, made_up))


def test_made_up_id_for_a_real_key_is_401(gateway: Gateway) -> None:
    key_id, _ = gateway.create_key(name="sapiom-guess")
    assert_unauthorized(present(gateway, f"stx_{key_id}_{'ab' * 16}"))


def test_another_keys_transaction_is_401_and_stays_usable_by_its_owner(gateway: Gateway) -> None:
    owner_id, owner = gateway.create_key(name="sapiom-owner")
    _, other = gateway.create_key(name="sapiom-other")
    transaction_id = authorized(gateway, owner, "GET", "/v1/usage")

    assert_unauthorized(present(gateway, transaction_id, key=other))
    with httpx.Client(base_url=gateway.url, timeout=30) as control:
        response = control.get(f"/v1/transactions/{transaction_id}", headers={"x-api-key": other})
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found"

    # Its own key may send both; then the transaction is checked and used as well.
    both = present(gateway, transaction_id, key=owner)
    assert both.status_code == 200 and both.json()["key_id"] == owner_id
    assert_unauthorized(present(gateway, transaction_id, key=owner))


def test_invalid_credentials_are_not_rescued_by_a_transaction(gateway: Gateway) -> None:
    _, key = gateway.create_key(name="sapiom-credentials")
    transaction_id = authorized(gateway, key, "GET", "/v1/usage")
    assert_unauthorized(present(gateway, transaction_id, key="fgk_not-a-real-key"))
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        malformed = client.get(
            "/v1/usage",
            headers={"X-Sapiom-Transaction-Id": transaction_id, "Authorization": "Basic eDp5"},
        )
    assert_unauthorized(malformed)


PUBLIC_URL = "https://falgate.example.com/gateway"


@pytest.fixture(scope="module")
def proxied_gateway(gateways: GatewayFactory) -> Iterator[Gateway]:
    """A gateway behind a (pretend) TLS-terminating proxy, with 2-second transactions."""
    gateway = gateways.start(
        FALGATE_PUBLIC_URL=PUBLIC_URL + "/", FALGATE_SAPIOM_TRANSACTION_TTL_S="2"
    )
    yield gateway
    gateway.stop()


def test_behind_a_proxy_transactions_name_the_public_url(proxied_gateway: Gateway) -> None:
    _, key = proxied_gateway.create_key(name="sapiom-proxied")
    public = authorized(proxied_gateway, key, "GET", f"{PUBLIC_URL}/v1/usage")
    direct = authorized(proxied_gateway, key, "GET", f"{proxied_gateway.url}/v1/usage")

    assert present(proxied_gateway, public).status_code == 200
    assert_unauthorized(present(proxied_gateway, direct))


def test_expired_transaction_is_401(proxied_gateway: Gateway) -> None:
    _, key = proxied_gateway.create_key(name="sapiom-expiry")
    transaction_id = authorized(proxied_gateway, key, "GET", f"{PUBLIC_URL}/v1/usage")
    path = f"/v1/transactions/{transaction_id}"
    with httpx.Client(base_url=proxied_gateway.url, headers={"x-api-key": key}) as control:
        assert control.get(path).json()["status"] == "authorized"
        time.sleep(2.5)
        assert control.get(path).status_code == 404
    assert_unauthorized(present(proxied_gateway, transaction_id))


def test_revoked_expired_and_exhausted_keys_are_denied_up_front(
    gateway: Gateway, clean_sandbox: Sandbox
) -> None:
    revoked_id, revoked = gateway.create_key(name="sapiom-revoked")
    with gateway.admin() as admin:
        assert admin.delete(f"/admin/keys/{revoked_id}").status_code == 200
    soon = (datetime.now(UTC) + timedelta(seconds=1)).isoformat()
    _, expired = gateway.create_key(name="sapiom-expired", expires_at=soon)
    time.sleep(1.2)  # an expiry must be in the future when it is set
    _, exhausted = gateway.create_key(
        name="sapiom-exhausted", budget_usd=f"{SQUARE_COST / 1e6:.6f}", budget_period="total"
    )
    with gateway.client(exhausted) as client:
        assert client.post("/v1/generate", json=SQUARE).status_code == 200  # spends it all

    for key, reason in ((revoked, "revoked"), (expired, "expired"), (exhausted, "budget")):
        response = create(gateway, key, "POST", "/v1/generate")
        assert response.status_code == 201, response.text
        body = response.json()
        assert body["status"] == "denied" and reason in body["reason"], body
        # A denied transaction authenticates nothing, and its status can be read back.
        assert_unauthorized(present(gateway, body["id"], "POST", "/v1/generate", json=SQUARE))
    with httpx.Client(base_url=gateway.url, timeout=30) as control:
        got = control.get(f"/v1/transactions/{body['id']}", headers={"x-api-key": exhausted})
    assert got.status_code == 200, got.text
    assert got.json()["status"] == "denied" and "budget" in got.json()["reason"]
    assert len(clean_sandbox.requests()) == 1  # only the spending request reached fal


def test_key_state_is_read_when_the_transaction_is_used(
    gateway: Gateway, clean_sandbox: Sandbox
) -> None:
    key_id, key = gateway.create_key(
        name="sapiom-later", budget_usd=f"{SQUARE_COST / 1e6:.6f}", budget_period="total"
    )
    for_spend = authorized(gateway, key, "POST", "/v1/generate")
    for_revoke = authorized(gateway, key, "GET", "/v1/usage")
    with gateway.client(key) as client:
        assert client.post("/v1/generate", json=SQUARE).status_code == 200

    over = present(gateway, for_spend, "POST", "/v1/generate", json=SQUARE)
    assert over.status_code == 402 and over.json()["error"]["type"] == "budget_exceeded"
    with gateway.admin() as admin:
        assert admin.delete(f"/admin/keys/{key_id}").status_code == 200
    assert_unauthorized(present(gateway, for_revoke))


def test_control_plane_authenticates_x_api_key(gateway: Gateway) -> None:
    with httpx.Client(base_url=gateway.url, timeout=30) as control:
        missing = control.post("/v1/transactions", json=facts("GET", f"{gateway.url}/v1/usage"))
        unknown = control.post(
            "/v1/transactions",
            json=facts("GET", f"{gateway.url}/v1/usage"),
            headers={"x-api-key": "fgk_unknown"},
        )
    assert_unauthorized(missing)
    assert_unauthorized(unknown)


def test_bad_transaction_bodies_are_400(gateway: Gateway) -> None:
    _, key = gateway.create_key(name="sapiom-bodies")
    with httpx.Client(base_url=gateway.url, headers={"x-api-key": key}, timeout=30) as control:
        for body in (
            {},
            {"requestFacts": {"request": {"method": "GET"}}},
            facts("GET", "ftp://gw/v1/usage"),
            facts("GET", "/v1/usage"),
            facts("G E T", f"{gateway.url}/v1/usage"),
            facts("GET", "http://[::1"),
        ):
            response = control.post("/v1/transactions", json=body)
            assert response.status_code == 400, (body, response.text)
            assert response.json()["error"]["type"] == "invalid_request"
        not_json = control.post(
            "/v1/transactions", content=b"{", headers={"content-type": "application/json"}
        )
        assert not_json.status_code == 400


def test_complete_and_get(gateway: Gateway) -> None:
    _, key = gateway.create_key(name="sapiom-complete")
    transaction_id = authorized(gateway, key, "GET", "/v1/usage")
    unused = authorized(gateway, key, "GET", "/v1/usage")
    assert present(gateway, transaction_id).status_code == 200
    with httpx.Client(base_url=gateway.url, headers={"x-api-key": key}, timeout=30) as control:
        assert control.get(f"/v1/transactions/{transaction_id}").json() == {
            "id": transaction_id,
            "status": "authorized",
            "reason": None,
        }
        done = control.post(
            f"/v1/transactions/{transaction_id}/complete",
            json={"outcome": "success", "responseFacts": {"facts": {"status": 200}}},
        )
        assert done.status_code == 200 and done.json()["status"] == "completed"
        assert control.get(f"/v1/transactions/{transaction_id}").json()["status"] == "completed"
        # Completing one that was never used closes it too.
        assert control.post(f"/v1/transactions/{unused}/complete").status_code == 200
        missing = control.post("/v1/transactions/stx_nope/complete", json={})
        assert missing.status_code == 404
        assert control.get("/v1/transactions/stx_nope").status_code == 404
    assert_unauthorized(present(gateway, unused))


def test_identity_token_for_newer_sdks(gateway: Gateway) -> None:
    key_id, key = gateway.create_key(name="sapiom-identity")
    with httpx.Client(base_url=gateway.url, headers={"x-api-key": key}, timeout=30) as control:
        response = control.post("/v1/auth/tokens", json={})
    assert response.status_code == 200, response.text
    body = response.json()
    header, payload, signature = body["identity"].split(".")
    assert signature
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["sub"] == key_id
    expires = datetime.fromisoformat(body["identityExpiresAt"].replace("Z", "+00:00"))
    assert expires > datetime.now(UTC) + timedelta(days=300)
    assert json.loads(base64.urlsafe_b64decode(header + "=="))["typ"] == "JWT"


def test_transaction_ids_never_reach_the_logs(gateway: Gateway) -> None:
    key_id, key = gateway.create_key(name="sapiom-logs")
    transaction_id = authorized(gateway, key, "GET", "/v1/usage")
    with httpx.Client(base_url=gateway.url, headers={"x-api-key": key}, timeout=30) as control:
        assert control.get(f"/v1/transactions/{transaction_id}").status_code == 200
    secret = transaction_id.rsplit("_", 1)[1]
    for _ in range(100):  # the access line is written as the response goes out
        if f"/v1/transactions/stx_{key_id}_[redacted]" in gateway.output():
            break
        time.sleep(0.05)
    else:
        raise AssertionError("no access line for the transaction lookup")
    assert secret not in gateway.output()
