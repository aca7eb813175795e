"""The seed's Sapiom-wrapped code, run by the official ``@sapiom/fetch`` against ``falgate serve``.

Both base URLs point at the gateway and the SDK's ``apiKey`` is a falgate key; the sandbox is
fal. What the gateway billed must equal, to the micro-dollar, what the sandbox produced.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from tests.conftest import Gateway, Sandbox
from tests.money import FLUX_DEV_MICRO_PER_MP, cost_of
from tests.sapiom.conftest import NodeRunner

GENERATE_USD_PER_MP = FLUX_DEV_MICRO_PER_MP
TRANSFORM_USD_PER_MP = 45_000  # micro-dollars per megapixel of output, whatever the model


def ledger(gateway: Gateway, key_id: str) -> list[dict[str, Any]]:
    with gateway.admin() as admin:
        response = admin.get("/admin/ledger", params={"key_id": key_id, "format": "jsonl"})
    assert response.status_code == 200, response.text
    return [json.loads(line) for line in response.text.splitlines()]


def test_sample_flow_generate_then_transform_is_billed_exactly(
    gateway: Gateway, clean_sandbox: Sandbox, sapiom_node: NodeRunner
) -> None:
    key_id, key = gateway.create_key(name="sapiom-sdk", budget_usd="5")

    out = sapiom_node.run("sample_flow.mjs", gateway.url, key)

    assert out["error"] is None, out
    generated, transformed = out["results"]
    assert generated["status"] == 200, generated
    assert transformed["status"] == 200, transformed
    assert (generated["body"]["images"][0]["width"], generated["body"]["images"][0]["height"]) == (
        1024,
        768,
    )
    assert transformed["body"]["images"][0]["width"] == 512
    assert "[Sapiom]" not in out["stderr"], out["stderr"]  # the SDK never failed open

    # What went over the wire: per request, a transaction at the control plane, the target
    # request with only the transaction header (never the key), then the completion.
    sent = out["sent"]
    creates = [s for s in sent if s["url"] == f"{gateway.url}/v1/transactions"]
    targets = [s for s in sent if s["transactionId"] is not None]
    completes = [s for s in sent if s["url"].endswith("/complete")]
    assert len(creates) == 2 and len(completes) == 2
    assert all("x-api-key" in s["headers"] for s in creates + completes)
    assert [t["url"] for t in targets] == [
        f"{gateway.url}/v1/run/fal-ai/flux/dev",
        f"{gateway.url}/v1/transform",
    ]
    for target in targets:
        assert "authorization" not in target["headers"] and "x-api-key" not in target["headers"]
    transaction_ids = [t["transactionId"] for t in targets]
    assert len(set(transaction_ids)) == 2

    with httpx.Client(base_url=gateway.url, headers={"x-api-key": key}, timeout=30) as control:
        for transaction_id in transaction_ids:
            got = control.get(f"/v1/transactions/{transaction_id}")
            assert got.status_code == 200, got.text
            assert got.json()["status"] == "completed"

    # The ledger equals what the sandbox produced, to the micro-dollar.
    entries = ledger(gateway, key_id)
    settles = [e for e in entries if e["event"] == "settle"]
    assert [e["operation"] for e in settles] == ["generate", "transform"]
    produced = {r["request_id"]: r for r in clean_sandbox.requests()}
    expected = []
    for entry, unit in zip(settles, (GENERATE_USD_PER_MP, TRANSFORM_USD_PER_MP), strict=True):
        job = produced[entry["upstream_request_id"]]
        assert job["status"] == "completed"
        expected.append(cost_of(job["pixels"], unit))
        assert entry["amount_micro"] == expected[-1]
    assert len(produced) == 2
    assert expected == [
        cost_of(1024 * 768, GENERATE_USD_PER_MP),
        cost_of(512 * 512, TRANSFORM_USD_PER_MP),
    ]
    assert [generated["cost"], transformed["cost"]] == [f"0.{c:06d}" for c in expected]
    with gateway.client(key) as client:
        usage = client.get("/v1/usage").json()
    assert usage["spent_usd"] == f"0.{sum(expected):06d}"
    assert usage["held_usd"] == "0.000000"

    # A transaction the SDK used cannot be used again, even for the very same request.
    with httpx.Client(base_url=gateway.url, timeout=30) as anonymous:
        replay = anonymous.post(
            "/v1/run/fal-ai/flux/dev",
            json={"prompt": "again", "image_size": "landscape_4_3"},
            headers={"X-Sapiom-Transaction-Id": transaction_ids[0]},
        )
    assert replay.status_code == 401
    assert replay.json()["error"]["type"] == "unauthorized"


def test_sdk_throws_before_sending_for_a_revoked_key(
    gateway: Gateway, clean_sandbox: Sandbox, sapiom_node: NodeRunner
) -> None:
    key_id, key = gateway.create_key(name="sapiom-revoked")
    with gateway.admin() as admin:
        assert admin.delete(f"/admin/keys/{key_id}").status_code == 200

    out = sapiom_node.run("sample_flow.mjs", gateway.url, key)

    assert out["error"]["name"] == "AuthorizationDeniedError", out
    assert [s["url"] for s in out["sent"]] == [f"{gateway.url}/v1/transactions"]
    assert clean_sandbox.requests() == []


def test_budget_running_out_mid_flow_reaches_the_caller_as_falgates_402(
    gateway: Gateway, clean_sandbox: Sandbox, sapiom_node: NodeRunner
) -> None:
    generate_cost = cost_of(1024 * 768, GENERATE_USD_PER_MP)
    key_id, key = gateway.create_key(
        name="sapiom-402", budget_usd=f"{(generate_cost + 1000) / 1e6:.6f}", budget_period="total"
    )

    out = sapiom_node.run("sample_flow.mjs", gateway.url, key)

    assert out["error"] is None, out
    generated, transformed = out["results"]
    assert generated["status"] == 200
    # Some budget is left, so the transaction is authorized; the transform's estimate is more
    # than that, so falgate answers its own 402, which the SDK hands back untouched.
    assert transformed["status"] == 402, transformed
    error = transformed["body"]["error"]
    assert error["type"] == "budget_exceeded" and error["remaining_usd"] == "0.001000"
    assert not any(s["url"].endswith("/reauthorize") for s in out["sent"])
    settles = [e for e in ledger(gateway, key_id) if e["event"] == "settle"]
    assert [e["amount_micro"] for e in settles] == [generate_cost]
    assert len(clean_sandbox.requests()) == 1
