"""The fast encoders and parsers of issue 15 are really in use, and answer what they replace."""

from __future__ import annotations

import json
import logging
from decimal import Decimal

import redis.asyncio
from redis._parsers.hiredis import _AsyncHiredisParser
from starlette.responses import JSONResponse

from app.fastjson import FastJSONResponse, dumps
from app.ops.logging import JsonFormatter
from app.redis import redis_client
from app.settings import Settings


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
