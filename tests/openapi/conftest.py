"""One gateway for the contract tests, on a Redis of its own.

Schemathesis creates hundreds of keys and ledger entries; on their own Redis they cannot
change what other tests read (key lists, usage over all keys).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from app.redis import EmbeddedRedis
from tests.conftest import Gateway, GatewayFactory


@pytest.fixture(scope="session")
def contract_gateway(
    tmp_path_factory: pytest.TempPathFactory, gateways: GatewayFactory
) -> Iterator[Gateway]:
    redis = EmbeddedRedis(tmp_path_factory.mktemp("contract-redis"), persist=False)
    redis.start()
    gateway = gateways.start(FALGATE_REDIS_URL=redis.url)
    yield gateway
    gateway.stop()
    redis.stop()
