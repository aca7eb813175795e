"""The fast encoders and parsers of issue 15 are really in use, and answer what they replace."""

from __future__ import annotations

import gc
import json
import logging
from decimal import Decimal
from pathlib import Path

import pytest
import redis.asyncio
from redis._parsers.hiredis import _AsyncHiredisParser
from starlette.responses import JSONResponse

from app.fastjson import FastJSONResponse, dumps
from app.main import create_app
from app.ops.logging import JsonFormatter
from app.ops.runtime import YOUNG_THRESHOLD, fastapi_telemetry, settled, unsettled
from app.redis import redis_client
from app.settings import Settings
from tests.conftest import Sandbox


async def test_the_gateway_redis_client_parses_replies_with_hiredis(redis_url: str) -> None:
    client = redis_client(redis_url, Settings())
    try:
        assert await client.ping()
        assert isinstance(client, redis.asyncio.Redis)  # a single-server URL
        pool = client.connection_pool
        connection = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            assert isinstance(connection._parser, _AsyncHiredisParser)
        finally:
            await pool.release(connection)
    finally:
        await client.aclose()


def test_fast_json_response_writes_what_starlette_writes() -> None:
    body: dict[str, object] = {
        "images": [{"url": "http://x/é.png", "width": 1024}],
        "cost": {"mp": 1.048576},
        "prompt": 'a "quoted" fox\n',
        "none": None,
        "ok": True,
    }
    assert FastJSONResponse(body).body == JSONResponse(body).body


def test_dumps_falls_back_for_what_orjson_cannot_encode() -> None:
    assert json.loads(dumps({"big": 2**70, "price": Decimal("0.5")})) == {
        "big": 2**70,
        "price": "0.5",
    }
    assert json.loads(dumps({1: "a"})) == {"1": "a"}


def test_log_lines_are_json_with_extras_and_secrets_blanked() -> None:
    formatter = JsonFormatter(redact=["s3cr3t-admin-token"])
    record = logging.LogRecord("falgate", logging.INFO, __file__, 1, "token %s", None, None)
    record.args = ("s3cr3t-admin-token",)
    record.amount = Decimal("1.25")
    record.key = "fgk_abcdefghijklmnop"
    line = formatter.format(record)
    data = json.loads(line)
    assert data["msg"] == "token [redacted]"
    assert data["amount"] == "1.25"
    assert data["key"] == "fgk_[redacted]"
    assert (data["level"], data["logger"]) == ("info", "falgate")


def test_settled_freezes_the_heap_and_unsettled_gives_it_back() -> None:
    before = gc.get_threshold()
    thresholds = settled()
    try:
        assert thresholds == before
        assert gc.get_freeze_count() > 1000  # at least this test process's modules
        assert gc.get_threshold() == (YOUNG_THRESHOLD, before[1], before[2])
    finally:
        unsettled(thresholds)
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == before


async def test_a_serving_gateway_keeps_its_start_up_heap_out_of_the_collector(
    redis_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    """The lifespan settles the heap once everything is built, and unsettles it on the way out."""
    before = gc.get_threshold()
    settings = Settings(
        redis_url=redis_url,
        sandbox_url=sandbox.url,
        data_dir=tmp_path,
        ledger_drain_interval_s=0,
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        assert gc.get_freeze_count() > 1000
        assert gc.get_threshold()[0] == YOUNG_THRESHOLD
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == before


def test_fastapis_own_telemetry_is_off_unless_fastapi_is_asked_to_set_it_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("FASTAPI_OTEL_AUTO_CONFIGURE", raising=False)
    off = {"tracing": False, "metrics": False, "logs": False}
    assert fastapi_telemetry() == {"telemetry": off}
    app = create_app(Settings())
    assert not app._native_telemetry.enabled()  # no per-request provider lookups
    assert {name: app._telemetry[name] for name in off} == off  # type: ignore[literal-required]
    monkeypatch.setenv("FASTAPI_OTEL_AUTO_CONFIGURE", "true")
    assert fastapi_telemetry() == {}
    assert create_app(Settings())._telemetry["tracing"] is True
