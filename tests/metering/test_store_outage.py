"""Redis stopped: every metering call is a 503 ``Unavailable``, never unmetered work; Redis
back (empty script cache after a restart): everything works again by itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from app.errors import Unavailable
from app.metering import Meter
from app.metering.idempotency import IdempotencyStore
from app.ratelimit.upstream_gate import UpstreamGate
from app.redis import EmbeddedRedis
from app.settings import Settings


async def test_outage_is_unavailable_then_recovers(
    tmp_path: Path, settings: Settings, price: Any, connect: Any, write_key: Any
) -> None:
    server = EmbeddedRedis(tmp_path / "redis", persist=True)
    server.start()
    client = connect(server.url)
    try:
        meter = Meter(client, settings, "proc_a")
        gate = UpstreamGate(client, settings, "proc_a")
        store = IdempotencyStore(Meter(client, settings, "proc_a"))
        await write_key(client, "key_a", budget_micro=10_000)

        async def admit(rid: str) -> Any:
            return await meter.admit(
                key_id="key_a", request_id=rid, model="m", operation="generate",
                estimate=price(1_000), endpoint="m",
            )  # fmt: skip

        first = await admit("req_1")
        await meter.settle(first, price(1_000))

        server.stop()
        with pytest.raises(Unavailable) as info:
            await admit("req_2")
        assert info.value.status_code == 503
        for call in (
            meter.usage("key_a"),
            gate.acquire("key_a", "req_2"),
            store.begin(
                key_id="key_a", idempotency_key="k", method="POST", path="/", body=b"",
                request_id="req_2",
            ),
        ):  # fmt: skip
            with pytest.raises(Unavailable):
                await call

        restarted = EmbeddedRedis(tmp_path / "redis", port=server.port, persist=True)
        restarted.password = server.password
        restarted.start()
        server = restarted
        await client.script_flush()  # as after a failover to a server without our scripts

        second = await admit("req_3")  # NOSCRIPT -> loaded again, no manual step
        assert (await meter.settle(second, price(1_000))).remaining == 8_000
        async with gate.slot("key_a", "req_4"):
            pass
    finally:
        await client.aclose()
        server.stop()
