"""``SessionStore``: session records in one Redis or a Redis Cluster (docs/contract.md §2).

Round trips: ``load`` of a whole batch is one pipeline of ``EVALSHA`` (read + TTL refresh), and
``save`` of a whole batch is one pipeline of ``EVALSHA`` compare-and-set writes (record layout:
``record``; scripts: ``scripts``). The scripts are sent by SHA in that same pipeline; only after
a ``NOSCRIPT`` (a restarted or failed-over Redis has no scripts) are they loaded again and the
refused calls re-sent — a refused call did nothing, so re-sending it is safe. (redis-py's
``register_script`` would instead add a ``SCRIPT EXISTS`` round trip to every pipeline.)

A pipeline is not a transaction across sessions: after an error some sessions of a batch may be
written and others not. That is fine because each session's write is independent and is one
atomic script, so no record is ever half-written; callers learn the outcome per session, and a
batch that failed with ``StoreUnavailable`` is failed as a whole to its requests (their clients
retry; idempotent replay covers the ones that did apply). A record that cannot be decoded is
not an error of the batch: ``load`` returns it as a ``SessionCorrupt`` in its place.

The store starts no processes: it connects to a URL (an embedded Redis is the composition's,
``service.store.embedded``). Cluster specifics are in ``cluster``; outages become
``StoreUnavailable`` (``translate``), after redis-py's own retries.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import NoScriptError, ResponseError

from service.errors import StoreUnavailable, TooManySessions
from service.store import cluster as cl
from service.store import counting
from service.store.direct import DirectCommands
from service.store.limits import LIMIT_SCRIPTS, take_call
from service.store.packing import connection_class
from service.store.record import (
    KEY_PATTERN,
    Loaded,
    SessionRecord,
    WriteOutcome,
    check,
    decode,
    encode,
    encode_constants,
    new_write_token,
    replay_key,
    session_key,
)
from service.store.scripts import SCRIPTS, Call
from service.store.translate import RETRY_ON, is_unavailable_reply, translated, unavailable

# SessionRecord, WriteOutcome and session_key are re-exported for callers that import them from here.
__all__ = ["SCHEMES", "Loaded", "SessionRecord", "SessionStore", "WriteOutcome", "session_key"]
SCHEMES = ("redis://", "rediss://", "unix://")
ALL_SCRIPTS = {**SCRIPTS, **counting.COUNTING_SCRIPTS, **LIMIT_SCRIPTS}
# What a call raises after three NOSCRIPT rounds in a row.
SCRIPTS_LOST = "Redis keeps forgetting the store's scripts (SCRIPT FLUSH in a loop?)"
_OUTCOMES = {1: WriteOutcome.OK, 0: WriteOutcome.CONFLICT, -1: WriteOutcome.MISSING}


class SessionStore:
    """Async session store over one Redis or a Redis Cluster. Safe for concurrent use."""

    def __init__(self, client: aioredis.Redis | RedisCluster) -> None:
        self._redis: aioredis.Redis | RedisCluster = client
        # The scripts' hot path to a single Redis (None in a cluster: redis-py routes by slot).
        self._direct = DirectCommands(client.connection_pool) if isinstance(client, aioredis.Redis) else None
        self.round_trips = 0  # one per pipeline execution or single command sent
        self._admit: cl.Admission | None = None  # cluster mode only (see service.store.cluster)

    @property
    def cluster(self) -> bool:
        """Whether ``connect`` found a Redis Cluster behind the URL."""
        return isinstance(self._redis, RedisCluster)

    @classmethod
    async def connect(cls, url: str, *, socket_timeout_s: float = 2.0, max_connections: int = 64) -> SessionStore:
        """Connect to the Redis at ``url`` (``redis://``, ``rediss://`` or ``unix://``).

        Pings, recognises a Redis Cluster (see ``service.store.cluster``) and loads the scripts;
        raises ``StoreUnavailable`` if Redis does not answer. At most ``max_connections``
        connections (per node, in a cluster): more concurrent callers wait for a free one (up to
        the socket timeout) instead of failing, so a burst of requests queues.
        """
        if not url.startswith(SCHEMES):
            raise ValueError(f"Redis URL {url!r} must start with one of {', '.join(SCHEMES)}")
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            connection_class=connection_class(url),
            max_connections=max_connections,
            timeout=socket_timeout_s,  # waiting for a free connection
            decode_responses=False,  # states are bytes
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
            # A dropped connection is retried on a fresh one after a short backoff; the pool
            # reconnects by itself, so after an outage the same store works again.
            retry=Retry(ExponentialBackoff(cap=0.25, base=0.025), retries=2),
            retry_on_error=list(RETRY_ON),
        )
        # redis-py's URL parser picks the class for unix:// and rediss:// itself, over the one
        # given: set ours again, or those URLs would pack every command in Python.
        pool.connection_class = connection_class(url)
        store = cls(aioredis.Redis.from_pool(pool))  # the client owns the pool: aclose() closes it
        try:
            try:
                await store.ping()
            except ResponseError as e:  # not an outage: e.g. a database the server lacks (a cluster has only 0)
                raise ValueError(f"Redis at {url!r} refused the connection: {e}") from None
            if await cl.is_cluster_node(store._single(), store._sent):
                await store._switch_to_cluster(url, socket_timeout_s=socket_timeout_s, max_connections=max_connections)
            await store._load_scripts()
        except BaseException:
            await store.close()
            raise
        return store

    async def close(self) -> None:
        """Close the connections."""
        await self._redis.aclose()

    async def ping(self) -> None:
        """PING the Redis, or every primary of a cluster."""
        async with self._op():
            if isinstance(self._redis, RedisCluster):
                await self._redis.ping(target_nodes=RedisCluster.PRIMARIES)
            else:
                await self._redis.ping()

    async def create(self, record: SessionRecord, *, max_sessions: int = 0, max_per_owner: int = 0) -> bool:
        """Create iff the key does not exist (False if it does). ``revision`` is stored as given;
        a new session has no replay copy (``last_reply`` is not written).

        The session is counted first (``counting``): ``TooManySessions`` if the store already
        holds ``max_sessions`` live sessions or the owner ``max_per_owner`` (0 = no limit)."""
        check(record)
        reserve = counting.reserve_call(record.owner, record.session_id, record.ttl_s, max_sessions, max_per_owner)
        [reserved] = await self._run([reserve])
        if reserved < 0:  # full, unless due members have expired meanwhile: reconcile, ask again
            await self.count_sessions(record.owner)
            [reserved] = await self._run([reserve])
        if reserved == counting.SERVER_FULL:
            raise TooManySessions(f"the server holds its limit of {max_sessions} sessions")
        if reserved == counting.OWNER_FULL:
            raise TooManySessions(f"this API key holds its limit of {max_per_owner} sessions")
        args = [record.ttl_s * 1000, new_write_token(), *encode(record), *encode_constants(record)]
        [created] = await self._run([(SCRIPTS["create"], (session_key(record.session_id),), args)])
        return bool(created)

    async def load(self, ids: Sequence[str], *, with_reply: bool = False) -> list[Loaded]:
        """Per id, in order: its record, None where missing, or a ``SessionCorrupt`` (returned,
        not raised) where the key holds no well-formed record. One round trip; refreshes each TTL.

        ``last_reply`` (the replay copy, another key) comes back empty unless ``with_reply``, and
        then only while it is kept (see ``save``). Raises only for the whole batch
        (``StoreUnavailable``).
        """
        calls: list[Call] = [
            (SCRIPTS["load"], (session_key(i), replay_key(i)) if with_reply else (session_key(i),), ()) for i in ids
        ]
        replies = await self._run(calls)
        return [decode(keys[0], r) for (_, keys, _), r in zip(calls, replies, strict=True)]

    async def save(
        self, writes: Sequence[tuple[SessionRecord, int]], *, replay_window_s: float = 60.0
    ) -> list[WriteOutcome]:
        """Compare-and-set each ``(new_record, expected_revision)``; one round trip for the batch.

        Applies iff the stored revision equals ``expected_revision`` (the new record's revision
        must be ``expected_revision + 1``); writes every field atomically and refreshes the TTL.
        In the same atomic step the session's replay copy is set to ``last_reply`` for
        ``replay_window_s`` seconds, or deleted when ``last_reply`` is empty.
        """
        # A fresh token each: a record copied from the one it replaces still carries that one's.
        tokened = [(replace(r, token=new_write_token()), expected, "", r.last_reply) for r, expected in writes]
        return [outcome for outcome, _ in await self.compare_and_set(tokened, replay_window_s=replay_window_s)]

    async def compare_and_set(
        self, writes: Sequence[tuple[SessionRecord, int, str, bytes]], *, replay_window_s: float = 60.0
    ) -> list[tuple[WriteOutcome, SessionRecord]]:
        """``save``, each ``(new_record, expected_revision, expected_token, replay)`` also comparing
        the stored write token with ``expected_token`` ('' = any: only the revision is compared),
        and keeping ``replay`` as the replay copy (b"": none; ``new_record.last_reply`` is not read).

        ``new_record.token`` is this write's token (what a later write passes as ``expected_token``
        to apply only over this one) when it is fresh: set, and not ``expected_token``; otherwise
        one is drawn here. Per write: its outcome and the record as written, with its token.
        """
        window_ms = max(1, round(replay_window_s * 1000))
        calls: list[Call] = []
        written: list[SessionRecord] = []
        for record, expected, expected_token, replay in writes:
            check(record)
            if record.revision != expected + 1:
                raise ValueError(
                    f"session {record.session_id!r}: new revision {record.revision} "
                    f"must be expected revision {expected} + 1"
                )
            if not record.token or record.token == expected_token:  # e.g. a copy of the record it replaces
                record = replace(record, token=new_write_token())
            args = [
                expected,
                record.ttl_s * 1000,
                record.token,
                record.revision,
                window_ms,
                replay,
                expected_token,
                *encode(record),
            ]
            calls.append((SCRIPTS["save"], (session_key(record.session_id), replay_key(record.session_id)), args))
            written.append(record)
        outcomes = [_OUTCOMES[int(r)] for r in await self._run(calls)]
        return list(zip(outcomes, written, strict=True))

    async def delete(self, session_id: str, owner: str = "") -> bool:
        """Delete the session's key, whatever it holds (a corrupt record too), and uncount it
        (``owner``: the record's), in one round trip. False if absent."""
        delete = (counting.COUNTING_SCRIPTS["key_delete"], (session_key(session_id),), ())
        deleted, _ = await self._run([delete, counting.release_call(owner, session_id)])
        return bool(deleted)

    async def count_sessions(self, owner: str = "") -> counting.Tally:
        """Live sessions, of the store and of ``owner``, from the index (O(1) plus the expired
        ones reconciled since the last count; see ``counting``)."""
        return await counting.tally(self._run, owner, session_key)

    async def take_token(self, owner: str, rate: float, burst: int) -> float:
        """Take a token from ``owner``'s request bucket (``limits``): 0.0 if taken, else the
        seconds until one is back. Atomic in Redis, so one bucket serves every replica."""
        [(taken, wait_ms)] = await self._run([take_call(owner, rate, burst)])
        return 0.0 if taken else int(wait_ms) / 1000

    async def count(self) -> int:
        """Number of session keys, by SCAN (O(all keys), one round trip per 1000 keys scanned); in a
        cluster, SCAN of every primary, the primaries in parallel. An audit of the index that
        ``count_sessions`` reads: never on a request path."""
        if isinstance(self._redis, RedisCluster):
            async with self._op(trips=0):  # count_keys counts its SCAN pages
                return await cl.count_keys(self._redis, KEY_PATTERN, self._sent)
        seen: set[bytes | str] = set()  # SCAN may return a key twice while the keyspace resizes
        cursor = 0
        while True:
            async with self._op():
                cursor, keys = await self._redis.scan(cursor, match=KEY_PATTERN, count=1000)
            seen.update(keys)
            if cursor == 0:
                return len(seen)

    # -- internals ------------------------------------------------------------------------------

    def _sent(self) -> None:
        self.round_trips += 1

    def _single(self) -> aioredis.Redis:
        assert isinstance(self._redis, aioredis.Redis), "connected to a cluster"
        return self._redis

    @contextlib.asynccontextmanager
    async def _op(self, trips: int = 1) -> AsyncIterator[None]:
        """One operation against Redis (``trips`` round trips): admitted (cluster mode only), its
        errors translated."""
        self.round_trips += trips
        async with contextlib.AsyncExitStack() as stack:
            if self._admit is not None:
                await stack.enter_async_context(self._admit())
            await stack.enter_async_context(translated())
            yield

    async def _switch_to_cluster(self, url: str, *, socket_timeout_s: float, max_connections: int) -> None:
        """Replace the single-node client by a ``RedisCluster`` started from the URL's node."""
        cluster = cl.cluster_client(url, socket_timeout_s=socket_timeout_s, max_connections=max_connections)
        single, self._redis, self._direct = self._redis, cluster, None
        self._admit = cl.Admission(max_connections, socket_timeout_s)
        await single.aclose()
        async with self._op():
            await cluster.initialize()  # CLUSTER SLOTS: the nodes and which slots each one serves

    async def _load_scripts(self) -> None:
        if isinstance(self._redis, RedisCluster):
            async with self._op(trips=0):  # load_scripts counts one round trip per script
                shas = await cl.load_scripts(self._redis, ALL_SCRIPTS.values(), self._sent)
        else:
            async with self._op():
                pipe = self._redis.pipeline(transaction=False)
                for script in ALL_SCRIPTS.values():
                    pipe.script_load(script.source)
                shas = await pipe.execute()
        for script, reply in zip(ALL_SCRIPTS.values(), shas, strict=True):
            # A cluster's reply is one SHA, or per node ({node name: sha}) in some redis-py versions.
            for sha in reply.values() if isinstance(reply, dict) else (reply,):
                if (sha.decode() if isinstance(sha, bytes) else sha) != script.sha:
                    raise RuntimeError(f"Redis hashed script {script.name!r} to {sha!r}, not {script.sha}")

    async def _run(self, calls: Sequence[Call]) -> list[Any]:
        """EVALSHA every call in one pipeline; after NOSCRIPT, load the scripts and re-send only the
        refused calls (which did nothing). Returns the replies in order."""
        replies: list[Any] = [None] * len(calls)
        pending = list(range(len(calls)))
        for attempt in range(3):
            if not pending:
                break
            if attempt:
                await self._load_scripts()
            # One round trip (``direct``); in a cluster, one per node involved, sent in parallel
            # (redis-py groups the pipeline's commands by the node that serves each key's slot).
            async with self._op():
                commands = [("EVALSHA", calls[i][0].sha, len(calls[i][1]), *calls[i][1], *calls[i][2]) for i in pending]
                if self._direct is not None:
                    results = await self._direct.pipeline(commands)
                else:
                    pipe = self._redis.pipeline(transaction=False)
                    for command in commands:
                        # execute_command, not pipe.evalsha: redis-py's cluster pipeline blocks the
                        # evalsha method (redis-py #2914) but routes a queued EVALSHA by its keys.
                        pipe.execute_command(*command)
                    results = await pipe.execute(raise_on_error=False)
            refused = []
            for i, r in zip(pending, results, strict=True):
                if isinstance(r, NoScriptError):
                    refused.append(i)
                elif isinstance(r, Exception):
                    if is_unavailable_reply(r):
                        raise unavailable(r) from r
                    raise r
                else:
                    replies[i] = r
            pending = refused
        if pending:
            raise StoreUnavailable(SCRIPTS_LOST)
        return replies
