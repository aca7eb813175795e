"""Fixtures of the ops tests: real Redis Cluster and Sentinel topologies."""

from redis_topologies import redis_cluster, redis_sentinel

__all__ = ["redis_cluster", "redis_sentinel"]
