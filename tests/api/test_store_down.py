"""Redis unreachable: every route that needs it answers 503 in the envelope, never a 500."""

from __future__ import annotations

from pathlib import Path

from app.redis import EmbeddedRedis
from tests.conftest import GatewayFactory


def test_every_route_is_503_while_redis_is_down(gateways: GatewayFactory, tmp_path: Path) -> None:
    own = EmbeddedRedis(tmp_path / "redis", persist=True)
    own.start()
    gateway = gateways.start(FALGATE_REDIS_URL=own.url)
    try:
        key_id, secret = gateway.create_key(name="outage", budget_usd="1")
        own.stop()
        with gateway.client(secret) as client:
            for method, path, body in (
                ("POST", "/v1/generate", {"prompt": "x"}),
                ("POST", "/v1/generate/price", {"prompt": "x"}),
                ("GET", "/v1/usage", None),
                ("GET", "/v1/models", None),
            ):
                response = client.request(method, path, json=body)
                assert response.status_code == 503, (path, response.text)
                assert response.json()["error"]["type"] == "unavailable"
                assert "Traceback" not in response.text
        with gateway.admin() as admin:
            for method, path in (
                ("GET", "/admin/keys"),
                ("GET", f"/admin/keys/{key_id}"),
                ("DELETE", f"/admin/keys/{key_id}"),
                ("GET", "/admin/usage"),
                ("GET", "/admin/ledger"),
            ):
                response = admin.request(method, path)
                assert response.status_code == 503, (path, response.text)
                assert response.json()["error"]["type"] == "unavailable"
                assert "Traceback" not in response.text
            response = admin.post("/admin/keys", json={"name": "x"})
            assert response.status_code == 503
        assert gateway.client().get("/readyz").status_code == 503
        assert gateway.client().get("/healthz").status_code == 200
    finally:
        gateway.stop()
        own.stop()
