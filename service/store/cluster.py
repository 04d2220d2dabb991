"""Redis Cluster support (docs/contract.md §2: "Redis Cluster URLs work"): detection, the cluster client,
per-primary script loading and SCAN, and admission.

A cluster is recognised, not configured: the URL's node is asked ``INFO cluster`` (where ``INFO``
is refused, e.g. by an ACL: whether it answers ``CLUSTER INFO``, which a single Redis refuses),
and on ``cluster_enabled:1`` the store switches to redis-py's ``RedisCluster``, started from that
node (it discovers the others). So the ``redis://`` or ``rediss://`` URL of any node works, with
no special scheme; a ``unix://`` URL of a cluster node is refused (cluster clients reach the nodes
over TCP), and so is a database other than 0. Every key is one slot (the hash tag) and every
script touches only ``KEYS[1]``, so nothing else changes:

* ``load`` / ``save`` stay one pipeline each: redis-py splits it by node and sends the parts to
  their nodes in parallel, so a batch costs one round trip per node involved, concurrently, and
  is counted as one.
* The script cache is per node and not replicated: the scripts are loaded on every primary
  (``load_scripts``), at connect and again after a ``NOSCRIPT`` from any node.
* ``count`` SCANs every primary; ``ping`` pings every primary.
* redis-py's cluster pools fail at once (``MaxConnectionsError``) when all of a node's
  ``max_connections`` are busy; so the store admits at most ``max_connections`` operations at a
  time (``Admission``; each uses at most one connection per node) and the rest wait, up to the
  socket timeout, as the single-node ``BlockingConnectionPool`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisClusterException, ResponseError

from service.errors import StoreUnavailable
from service.store.scripts import Script
from service.store.translate import translated

log = logging.getLogger(__name__)

Sent = Callable[[], None]  # called once per round trip (the store's counter)


class Admission:
    """At most ``limit`` operations at a time; one that waits over ``wait_s`` is ``StoreUnavailable``."""

    def __init__(self, limit: int, wait_s: float) -> None:
        self._slots = asyncio.Semaphore(limit)
        self._wait_s = wait_s

    @contextlib.asynccontextmanager
    async def __call__(self) -> AsyncIterator[None]:
        try:
            async with asyncio.timeout(self._wait_s):
                await self._slots.acquire()
        except TimeoutError:
            raise StoreUnavailable(f"no free Redis connection within {self._wait_s:g} s") from None
        try:
            yield
        finally:
            self._slots.release()


async def is_cluster_node(client: aioredis.Redis, sent: Sent) -> bool:
    """``INFO cluster`` says ``cluster_enabled:1``; where INFO is refused (renamed, ACL), whether
    ``CLUSTER INFO`` answers (a single Redis refuses it: cluster support disabled)."""
    sent()
    try:
        async with translated():
            info = await client.info("cluster")
        return str(info.get("cluster_enabled", "0")) == "1"
    except ResponseError as e:
        log.debug("INFO cluster refused (%s); asking CLUSTER INFO", e)
    sent()
    try:
        async with translated():
            await client.execute_command("CLUSTER INFO")  # type: ignore[no-untyped-call]
        return True
    except ResponseError:
        return False


def cluster_client(url: str, *, socket_timeout_s: float, max_connections: int) -> RedisCluster:
    """A ``RedisCluster`` started from the URL's node (not yet initialised: no I/O here)."""
    if url.startswith("unix://"):
        raise ValueError(
            f"Redis URL {url!r} is a Redis Cluster node: give its redis:// or rediss:// URL "
            "(a cluster client reaches the nodes over TCP)"
        )
    try:
        return RedisCluster.from_url(
            url,
            max_connections=max_connections,  # per node; Admission admits that many operations at a time
            decode_responses=False,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
            # How many times redis-py re-discovers the topology and retries after a connection
            # error, a timeout or CLUSTERDOWN (MOVED/ASK/TRYAGAIN have their own redirections).
            retry=Retry(ExponentialBackoff(cap=0.25, base=0.025), retries=2),
        )
    except RedisClusterException as e:  # e.g. a database other than 0 in the URL
        raise ValueError(f"Redis URL {url!r} is a Redis Cluster node, but: {e}") from None


async def load_scripts(cluster: RedisCluster, scripts: Iterable[Script], sent: Sent) -> list[Any]:
    """SCRIPT LOAD on every primary (in parallel), one script at a time so that an operation never
    holds more than one connection per node. Returns each script's reply (a SHA, or per node
    ``{node name: sha}`` in some redis-py versions)."""
    replies = []
    for script in scripts:
        sent()
        replies.append(await cluster.execute_command("SCRIPT LOAD", script.source, target_nodes=RedisCluster.PRIMARIES))
    return replies


async def count_keys(cluster: RedisCluster, pattern: str, sent: Sent) -> int:
    """Keys matching ``pattern`` on every primary, the primaries SCANned in parallel."""
    await cluster.initialize()  # a no-op, unless a failure made redis-py drop the topology
    counts = await asyncio.gather(*(_count_on(cluster, node, pattern, sent) for node in cluster.get_primaries()))
    return sum(counts)


async def _count_on(cluster: RedisCluster, node: ClusterNode, pattern: str, sent: Sent) -> int:
    seen: set[bytes | str] = set()  # SCAN may return a key twice while the keyspace resizes
    cursor = 0
    while True:
        sent()
        reply: Any = await cluster.scan(cursor, match=pattern, count=1000, target_nodes=node)
        cursors, keys = reply  # redis-py merges per-node SCAN replies: ({node name: cursor}, keys)
        cursor = int(cursors[node.name] if isinstance(cursors, dict) else cursors)
        seen.update(keys)
        if cursor == 0:
            return len(seen)
