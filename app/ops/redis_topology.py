"""Redis clients for every deployment shape, chosen by the form of ``FALGATE_REDIS_URL``.

=====================================================================  =========================
URL                                                                    client
=====================================================================  =========================
``redis://[[user]:password@]host[:port][/db]``                         one server
``rediss://...``                                                       one server over TLS
``unix:///path/to/redis.sock[?db=0&password=...]``                     one server, Unix socket
``redis+cluster://[[user]:password@]host:port[,host:port...]``         Redis Cluster
``rediss+cluster://...``                                               Redis Cluster over TLS
``redis://host:port[,host:port...]?cluster=true``                      Redis Cluster (same)
``redis+sentinel://[[user]:password@]host:port[,host:port...]``        the master of a Sentinel-
``/service_name[/db]``                                                 monitored group
``rediss+sentinel://...``                                              the same over TLS
=====================================================================  =========================

The password in the URL is the data nodes' password. Sentinels that require their own password
take ``?sentinel_password=...``; TLS options ``?ssl_ca_certs=/path`` and
``?ssl_cert_reqs=none|optional|required`` apply to the cluster and sentinel forms (the single-
server forms take redis-py's own query options). Ports default to 6379 (26379 for sentinels).

Every client decodes responses to ``str``, uses the short socket timeouts from settings
(``FALGATE_REDIS_SOCKET_TIMEOUT_S``, ``FALGATE_REDIS_CONNECT_TIMEOUT_S``) so that an outage
turns into a quick 503, and checks idle connections before reuse. On a cluster every key of one
API key shares the hash tag ``{k:<id>}``, so the metering scripts touch a single slot.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from app.settings import Settings

# Idle connections are PINGed before reuse after this many seconds (redis-py's health check).
HEALTH_CHECK_INTERVAL_S = 10

_TRUE = {"1", "true", "yes", "on"}
_TOPOLOGY_OPTIONS = {"sentinel_password", "ssl_ca_certs", "ssl_cert_reqs", "cluster"}

RedisLike = aioredis.Redis | aioredis.RedisCluster


@dataclass(frozen=True)
class RedisTarget:
    """A parsed cluster or sentinel URL."""

    kind: str  # "cluster" | "sentinel"
    tls: bool
    nodes: list[tuple[str, int]]
    username: str | None = None
    password: str | None = None
    service_name: str | None = None
    db: int = 0
    options: dict[str, str] = field(default_factory=dict)


def _hosts(netloc: str, default_port: int) -> tuple[list[tuple[str, int]], str | None, str | None]:
    userinfo, _, hostlist = netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, sep, pwd = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(pwd) if sep else None
    nodes: list[tuple[str, int]] = []
    for item in hostlist.split(","):
        item = item.strip()
        if not item:
            continue
        if item.startswith("["):  # [ipv6]:port
            host, _, rest = item[1:].partition("]")
            port_s = rest.lstrip(":")
        else:
            host, _, port_s = item.partition(":")
        try:
            port = int(port_s) if port_s else default_port
        except ValueError as exc:
            raise ValueError(f"bad port in redis URL host {item!r}") from exc
        if not host:
            raise ValueError(f"missing host in redis URL entry {item!r}")
        nodes.append((host, port))
    if not nodes:
        raise ValueError("redis URL names no host")
    return nodes, username, password


def parse_topology_url(url: str) -> RedisTarget | None:
    """The cluster or sentinel target named by ``url``; None for a single-server URL."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    query = dict(parse_qsl(parts.query))
    base, _, topology = scheme.partition("+")
    if base not in ("redis", "rediss", "unix") or topology not in ("", "cluster", "sentinel"):
        raise ValueError(f"unsupported redis URL scheme {parts.scheme!r}")
    if topology == "" and query.get("cluster", "").lower() in _TRUE and base != "unix":
        topology = "cluster"
    if topology == "":
        return None
    if base == "unix":
        raise ValueError("cluster and sentinel URLs need redis:// or rediss:// hosts")
    unknown = set(query) - _TOPOLOGY_OPTIONS
    if unknown:
        raise ValueError(f"unsupported option(s) in redis URL: {', '.join(sorted(unknown))}")
    query.pop("cluster", None)
    tls = base == "rediss"
    if topology == "cluster":
        nodes, username, password = _hosts(parts.netloc, 6379)
        if parts.path.strip("/") not in ("", "0"):
            raise ValueError("Redis Cluster has only database 0")
        return RedisTarget("cluster", tls, nodes, username, password, options=query)
    nodes, username, password = _hosts(parts.netloc, 26379)
    segments = [unquote(s) for s in parts.path.split("/") if s]
    if not segments or len(segments) > 2:
        raise ValueError("sentinel URL needs /service_name[/db] after the hosts")
    try:
        db = int(segments[1]) if len(segments) == 2 else 0
    except ValueError as exc:
        raise ValueError(f"bad database number in sentinel URL: {segments[1]!r}") from exc
    return RedisTarget("sentinel", tls, nodes, username, password, segments[0], db, query)


def _connection_kwargs(settings: Settings) -> dict[str, Any]:
    return {
        "decode_responses": True,
        "socket_timeout": settings.redis_socket_timeout_s,
        "socket_connect_timeout": settings.redis_connect_timeout_s,
        "health_check_interval": HEALTH_CHECK_INTERVAL_S,
        # One immediate retry on a broken connection: after a Redis restart every pooled
        # connection is stale and would otherwise fail one request each. Timeouts are not
        # retried (the command may have run), so an outage still answers 503 quickly.
        "retry": Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
    }


def _tls_kwargs(target: RedisTarget) -> dict[str, Any]:
    if not target.tls:
        return {}
    tls: dict[str, Any] = {"ssl": True}
    if "ssl_ca_certs" in target.options:
        tls["ssl_ca_certs"] = target.options["ssl_ca_certs"]
    if "ssl_cert_reqs" in target.options:
        tls["ssl_cert_reqs"] = target.options["ssl_cert_reqs"]
    return tls


def redis_from_url(url: str, settings: Settings) -> aioredis.Redis | aioredis.RedisCluster:
    """An asyncio Redis client for any of the URL forms in this module's docstring."""
    target = parse_topology_url(url)
    common = _connection_kwargs(settings)
    if target is None:
        # A request waits (up to ``redis_pool_timeout_s``) for a free connection rather than
        # failing when a burst has them all busy: a busy pool is not an outage.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=settings.redis_max_connections,
            timeout=settings.redis_pool_timeout_s,
            **common,
        )
        return aioredis.Redis(connection_pool=pool)
    tls = _tls_kwargs(target)
    auth: dict[str, Any] = {"username": target.username, "password": target.password}
    if target.kind == "cluster":
        # redis-py's cluster client has no waiting pool: the cap per node is a hard limit.
        return aioredis.RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
            max_connections=settings.redis_max_connections,
            **auth,
            **common,
            **tls,
        )
    sentinel_kwargs: dict[str, Any] = {
        "socket_timeout": settings.redis_socket_timeout_s,
        "socket_connect_timeout": settings.redis_connect_timeout_s,
        "decode_responses": True,
        **tls,
    }
    if "sentinel_password" in target.options:
        sentinel_kwargs["password"] = target.options["sentinel_password"]
    sentinel = Sentinel(target.nodes, sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call]
    assert target.service_name is not None
    client: aioredis.Redis = sentinel.master_for(
        target.service_name,
        db=target.db,
        max_connections=settings.redis_max_connections,
        **auth,
        **common,
        **tls,
    )
    return client
