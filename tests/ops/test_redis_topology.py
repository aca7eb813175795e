"""``FALGATE_REDIS_URL`` forms, and clients that work against a real Cluster and Sentinel."""

from __future__ import annotations

import uuid

import pytest
import redis.asyncio as aioredis
import redis.exceptions
from redis_topologies import RedisTopology

from app.ops.redis_topology import parse_topology_url, redis_from_url
from app.settings import Settings

SETTINGS = Settings(_env_file=None, redis_socket_timeout_s=0.5, redis_connect_timeout_s=0.5)

# Places a "hold": moves an amount into the held counter and records it, atomically.
HOLD_SCRIPT = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return redis.call('INCRBY', KEYS[2], ARGV[2])
"""


@pytest.mark.parametrize(
    ("url", "kind", "nodes", "extra"),
    [
        ("redis+cluster://a:7000,b:7001,c", "cluster", [("a", 7000), ("b", 7001), ("c", 6379)], {}),
        ("redis://a:7000,b:7001?cluster=true", "cluster", [("a", 7000), ("b", 7001)], {}),
        (
            "rediss+cluster://:s3cr%40t@[::1]:7000",
            "cluster",
            [("::1", 7000)],
            {"tls": True, "password": "s3cr@t"},
        ),
        (
            "redis+sentinel://s1,s2:26380/mymaster/2",
            "sentinel",
            [("s1", 26379), ("s2", 26380)],
            {"service_name": "mymaster", "db": 2},
        ),
        (
            "redis+sentinel://u:p@s1:26379/gw?sentinel_password=x",
            "sentinel",
            [("s1", 26379)],
            {"service_name": "gw", "db": 0, "username": "u", "password": "p"},
        ),
    ],
)
def test_topology_urls_parse(
    url: str, kind: str, nodes: list[tuple[str, int]], extra: dict[str, object]
) -> None:
    target = parse_topology_url(url)
    assert target is not None
    assert target.kind == kind
    assert target.nodes == nodes
    for name, value in extra.items():
        assert getattr(target, name) == value


@pytest.mark.parametrize(
    "url", ["redis://localhost:6379/0", "rediss://:pw@host:6380/1", "unix:///run/redis.sock"]
)
def test_single_server_urls_give_a_plain_client(url: str) -> None:
    assert parse_topology_url(url) is None
    client = redis_from_url(url, SETTINGS)
    assert type(client) is aioredis.Redis
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == 0.5
    assert kwargs["socket_connect_timeout"] == 0.5


@pytest.mark.parametrize(
    "url",
    [
        "memcached://localhost",
        "redis+sentinel://s1:26379",  # no service name
        "redis+cluster://a:7000/3",  # clusters have only db 0
        "redis+cluster://a:7000?pool=9",  # unknown option
        "redis+cluster://a:notaport",
    ],
)
def test_bad_urls_are_refused_at_startup(url: str) -> None:
    with pytest.raises(ValueError):
        redis_from_url(url, SETTINGS)


async def test_cluster_client_runs_commands_and_scripts(redis_cluster: RedisTopology) -> None:
    client = redis_from_url(redis_cluster.url, SETTINGS)
    assert isinstance(client, aioredis.RedisCluster)
    try:
        assert await client.ping()
        assert len(client.get_primaries()) == 3

        tag = f"{{k:{uuid.uuid4().hex[:8]}}}"
        await client.set(f"{tag}:name", "team-a")
        assert await client.get(f"{tag}:name") == "team-a"

        held = await client.eval(HOLD_SCRIPT, 2, f"{tag}:holds", f"{tag}:held", "h1", "11797")
        assert held == 11797
        assert await client.hget(f"{tag}:holds", "h1") == "11797"

        # The same script over two hash tags is refused: keys of one API key share a tag.
        with pytest.raises(redis.exceptions.RedisClusterException):
            await client.eval(HOLD_SCRIPT, 2, "{k:a}:holds", "{k:b}:held", "h1", "1")

        # Keys of many API keys spread over all three masters.
        nodes = {client.get_node_from_key(f"{{k:{i}}}:held") for i in range(64)}
        assert len(nodes) == 3 and None not in nodes
    finally:
        await client.aclose()


async def test_sentinel_client_reaches_the_master(redis_sentinel: RedisTopology) -> None:
    client = redis_from_url(redis_sentinel.url, SETTINGS)
    try:
        await client.set("{k:s}:name", "team-b")
        assert await client.get("{k:s}:name") == "team-b"
        assert (await client.info("replication"))["role"] == "master"
    finally:
        await client.aclose()


async def test_unreachable_redis_fails_instead_of_hanging() -> None:
    client = redis_from_url("redis://127.0.0.1:1/0", SETTINGS)
    try:
        with pytest.raises((redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
            await client.ping()
    finally:
        await client.aclose()
