"""One gateway for the contract tests, on a Redis and a sandbox of its own.

Schemathesis creates hundreds of keys, ledger entries and images; on their own Redis and
sandbox they cannot change what other tests read (key lists, usage over all keys, the
sandbox's request log), and the sandbox's images are freed when the tests are done.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from app.redis import EmbeddedRedis
from tests.conftest import Gateway, GatewayFactory, _stop, start_sandbox


@pytest.fixture(scope="session")
def contract_gateway(
    tmp_path_factory: pytest.TempPathFactory, gateways: GatewayFactory
) -> Iterator[Gateway]:
    redis = EmbeddedRedis(tmp_path_factory.mktemp("contract-redis"), persist=False)
    redis.start()
    sandbox = start_sandbox(tmp_path_factory.mktemp("contract-sandbox"))
    gateway = gateways.start(FALGATE_REDIS_URL=redis.url, FALGATE_SANDBOX_URL=sandbox.url)
    yield gateway
    gateway.stop()
    _stop(sandbox.proc)
    redis.stop()
