"""Session records in Redis (DESIGN §2): one hash per session, batched reads and CAS writes.

Layout: key ``carryover:{<session_id>}:s`` (the hash tag keeps a session's keys in one cluster
slot), one hash whose fields are the ``SessionRecord`` fields — numbers as decimal strings, the
state tensors as raw bytes in fields ``s0``, ``s1``, … in declared order — plus ``w``, a random
token naming the write that produced it (see ``_SAVE``). Every access sets the key's TTL back to
the record's ``ttl_s``.

Round trips: ``load`` of a whole batch is one pipeline of ``EVALSHA`` (read + TTL refresh), and
``save`` of a whole batch is one pipeline of ``EVALSHA`` compare-and-set writes. The scripts are
sent by SHA in that same pipeline; only after a ``NOSCRIPT`` (a restarted or failed-over Redis has
no scripts) are they loaded again and the refused calls re-sent — a refused call did nothing, so
re-sending it is safe. (redis-py's ``register_script`` would instead add a ``SCRIPT EXISTS`` round
trip to every pipeline.)

A pipeline is not a transaction across sessions: after an error some sessions of a batch may be
written and others not. That is fine because each session's write is independent and is one
atomic script, so no record is ever half-written; callers learn the outcome per session, and a
batch that failed with ``StoreUnavailable`` is failed as a whole to its requests (their clients
retry; idempotent replay covers the ones that did apply).

Redis Cluster (DESIGN §2: "Redis Cluster URLs work") is recognised, not configured: ``connect``
asks the URL's node ``INFO cluster`` (where ``INFO`` is refused, e.g. by an ACL: whether it
answers ``CLUSTER INFO``, which a single Redis refuses), and on ``cluster_enabled:1`` switches to
redis-py's ``RedisCluster``, started from that node (it discovers the others). So the
``redis://`` or ``rediss://`` URL of any cluster node works, with no special scheme; a
``unix://`` URL of a cluster node is refused (cluster clients reach the nodes over TCP), and so
is a database other than 0. Nothing else changes: every key is one slot (the hash tag) and every
script touches only ``KEYS[1]``.

* ``load`` / ``save`` stay one pipeline each: redis-py splits it by node and sends the parts to
  their nodes in parallel, so a batch costs one round trip per node involved, concurrently, and
  ``round_trips`` counts it as one.
* The script cache is per node and not replicated: the scripts are loaded on every primary (one
  ``SCRIPT LOAD`` per script, sent to all primaries at once), at connect and again after a
  ``NOSCRIPT`` from any node (a restarted, failed-over or newly added primary has none).
* ``count`` SCANs every primary; ``ping`` pings every primary.
* redis-py's cluster pools fail at once (``MaxConnectionsError``) when all of a node's
  ``max_connections`` are busy; so the store admits at most ``max_connections`` operations at a
  time (each uses at most one connection per node) and the rest wait, up to the socket timeout,
  as the single-node ``BlockingConnectionPool`` does.
* Cluster trouble (``CLUSTERDOWN``, ``TRYAGAIN``, endless ``MOVED``/``ASK``, an unreachable node,
  uncovered slots) is ``StoreUnavailable`` like any outage, after redis-py's own retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import logging
import secrets
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import (
    AskError,
    BusyLoadingError,
    ClusterDownError,
    ClusterError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.errors import StoreUnavailable
from service.store.embedded import EmbeddedRedis
from service.store.packing import connection_class

log = logging.getLogger(__name__)

KEY_PREFIX = "carryover:{"
KEY_SUFFIX = "}:s"
SCHEMES = ("redis://", "rediss://", "unix://")
_PATTERN = f"{KEY_PREFIX}*{KEY_SUFFIX}"  # SCAN MATCH for every session key


def session_key(session_id: str) -> str:
    return f"{KEY_PREFIX}{session_id}{KEY_SUFFIX}"


class StoreCorrupt(RuntimeError):
    """A key in the session namespace does not hold a well-formed record."""


@dataclass(frozen=True, slots=True)
class SessionRecord:
    session_id: str  # the stored id (already namespaced by the caller)
    model: str  # model name
    fingerprint: str  # model fingerprint (hex)
    step: int  # timesteps consumed
    revision: int  # CAS counter, +1 on every successful write; starts at 1 on create
    states: tuple[bytes, ...]  # raw little-endian state tensors, declared order
    owner: str  # hash of the creating API key, "" if none
    created_at: float  # unix seconds
    updated_at: float
    ttl_s: int  # this session's TTL in seconds
    last_digest: str = ""  # digest of the last applied request (idempotent replay)
    last_reply: bytes = b""  # opaque serialized outputs of the last applied request
    expires_in: float | None = None  # filled on reads from PTTL, seconds


class WriteOutcome(enum.Enum):
    OK = "ok"
    CONFLICT = "conflict"
    MISSING = "missing"


# -- scripts ------------------------------------------------------------------------------------
# Each touches only KEYS[1] (cluster-safe) and is atomic: Redis runs a script to the end or, if it
# is refused before its first write (e.g. OOM), not at all.

# ARGV: ttl_ms, write token, field, value, ...
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  -- Our own create, re-sent by a client retry after the reply was lost: it did apply.
  if redis.call('HGET', KEYS[1], 'w') == ARGV[2] then return 1 end
  return 0
end
redis.call('HSET', KEYS[1], 'w', ARGV[2], unpack(ARGV, 3))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""

# The CAS is on ``revision``, a counter bumped by every write, never on ``step``: a reset sets the
# step back to 0, so a step-count CAS can be fooled (ABA): a writer reads step 5, someone resets
# and steps the session back to 5, and the stale write would succeed over a different history.
# ARGV: expected revision, ttl_ms, write token, new revision, field, value, ...
# Returns 1 applied, 0 conflict, -1 missing. The whole hash is replaced (DEL + HSET), so no field
# of an older record (e.g. a state tensor the new one lacks) survives.
_SAVE = """
local cur = redis.call('HMGET', KEYS[1], 'revision', 'w')
if not cur[1] then return -1 end
if cur[1] ~= ARGV[1] then
  -- Our own write, re-sent by a client retry after the reply was lost: it did apply.
  if cur[1] == ARGV[4] and cur[2] == ARGV[3] then return 1 end
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'w', ARGV[3], unpack(ARGV, 5))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# Read and refresh the TTL in one step; returns nil or {flat field/value list, pttl_ms}.
# ARGV[1] == '1' includes ``last_reply``; batch loads leave it out (it is only needed to answer
# a replay, which then fetches it with a second call), so a load moves states, not old outputs.
_LOAD = """
local h = redis.call('HGETALL', KEYS[1])
if #h == 0 then return false end
if ARGV[1] ~= '1' then
  for i = 1, #h, 2 do
    if h[i] == 'last_reply' then h[i + 1] = '' end
  end
end
local ttl = tonumber(redis.call('HGET', KEYS[1], 'ttl_s'))
if ttl and ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) end
return {h, redis.call('PTTL', KEYS[1])}
"""


@dataclass(frozen=True, slots=True)
class _Script:
    name: str
    source: bytes
    sha: str

    @classmethod
    def of(cls, name: str, source: str) -> _Script:
        body = source.encode()
        return cls(name, body, hashlib.sha1(body).hexdigest())


_SCRIPTS = {s.name: s for s in (_Script.of("create", _CREATE), _Script.of("save", _SAVE), _Script.of("load", _LOAD))}
_Call = tuple[_Script, str, Sequence[bytes | str | int]]

# -- errors -------------------------------------------------------------------------------------

# Retried by redis-py on a fresh connection (with backoff) before we give up: a dropped socket,
# a restart, a failover. Writes are safe to re-send thanks to the write token.
_RETRY_ON: list[type[Exception]] = [RedisConnectionError, RedisTimeoutError, BusyLoadingError, OSError]
# Replies that mean "this Redis cannot serve us right now" rather than "you sent a bad command".
# In a cluster pipeline a node's failure also comes back as a reply (the other nodes' parts of the
# batch still ran): a connection error or timeout, ``MOVED``/``ASK`` left over after redis-py's
# redirections (``AskError`` covers ``MovedError``), ``ClusterError`` ("TTL exhausted"), or a
# ``RedisClusterException`` (e.g. a slot no node covers).
_UNAVAILABLE_REPLIES = (
    *(ReadOnlyError, ClusterDownError, TryAgainError, OutOfMemoryError),
    *(AskError, ClusterError, RedisClusterException, RedisConnectionError, RedisTimeoutError, OSError),
)


def _unavailable(e: BaseException) -> StoreUnavailable:
    if isinstance(e, BusyLoadingError):
        return StoreUnavailable(f"Redis is loading its data: {e}", retry_after=2.0)
    return StoreUnavailable(f"Redis unavailable: {type(e).__name__}: {e}")


def _is_unavailable_reply(r: object) -> bool:
    # BUSY: another client's script is running past lua-time-limit.
    return isinstance(r, _UNAVAILABLE_REPLIES) or (isinstance(r, ResponseError) and str(r).startswith("BUSY"))


@contextlib.asynccontextmanager
async def _translate() -> AsyncIterator[None]:
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError, OSError) as e:  # OSError covers asyncio timeouts
        raise _unavailable(e) from e
    except (ClusterError, RedisClusterException) as e:  # cluster down, TTL exhausted, slots not covered
        raise _unavailable(e) from e
    except ResponseError as e:
        if _is_unavailable_reply(e):
            raise _unavailable(e) from e
        raise


# -- encoding -----------------------------------------------------------------------------------

# Fields the Lua scripts read stay separate (``revision`` for the CAS, ``ttl_s`` for the TTL
# refresh, ``last_reply`` to leave out of batch loads); the rest travel as one JSON ``meta``
# field, because redis-py packs every command argument in Python and a batch write has
# max_batch_size commands: fewer arguments per record is measurably faster (bench/engine.py).
_META = ("session_id", "model", "fingerprint", "step", "owner", "created_at", "updated_at", "last_digest")
assert {*_META, "revision", "ttl_s", "states", "last_reply", "expires_in"} == {f.name for f in fields(SessionRecord)}, (
    "every SessionRecord field must be stored"
)


def _encode(record: SessionRecord) -> list[bytes | str]:
    """Flat field/value list for HSET."""
    meta = orjson.dumps({name: getattr(record, name) for name in _META})
    flat: list[bytes | str] = [
        "revision",
        str(int(record.revision)),
        "ttl_s",
        str(int(record.ttl_s)),
        "meta",
        meta,
        "last_reply",
        record.last_reply,
    ]
    for i, state in enumerate(record.states):
        flat += (f"s{i}", bytes(state))
    return flat


def _decode(key: str, flat: Sequence[bytes], pttl_ms: int) -> SessionRecord:
    h = dict(zip(flat[::2], flat[1::2], strict=True))
    try:
        n = sum(1 for k in h if k[:1] == b"s" and k[1:].isdigit())
        meta = orjson.loads(h[b"meta"])
        return SessionRecord(
            session_id=str(meta["session_id"]),
            model=str(meta["model"]),
            fingerprint=str(meta["fingerprint"]),
            step=int(meta["step"]),
            revision=int(h[b"revision"]),
            states=tuple(h[b"s%d" % i] for i in range(n)),
            owner=str(meta["owner"]),
            created_at=float(meta["created_at"]),
            updated_at=float(meta["updated_at"]),
            ttl_s=int(h[b"ttl_s"]),
            last_digest=str(meta["last_digest"]),
            last_reply=h[b"last_reply"],
            expires_in=pttl_ms / 1000 if pttl_ms >= 0 else None,
        )
    except (KeyError, ValueError, TypeError, orjson.JSONDecodeError) as e:
        raise StoreCorrupt(f"{key} does not hold a well-formed session record: {e!r}") from None


def _check(record: SessionRecord) -> None:
    if record.ttl_s <= 0:
        raise ValueError(f"session {record.session_id!r}: ttl_s must be positive, not {record.ttl_s}")


# -- the store ----------------------------------------------------------------------------------


class SessionStore:
    """Async session store over one Redis or a Redis Cluster (external URL or embedded). Safe for concurrent use."""

    def __init__(self, client: aioredis.Redis | RedisCluster, *, embedded: EmbeddedRedis | None = None) -> None:
        self._redis: aioredis.Redis | RedisCluster = client
        self.embedded = embedded  # the embedded server this store owns and stops on close()
        self.round_trips = 0  # one per pipeline execution or single command sent
        # Cluster mode: admits at most max_connections operations at a time (see the module docstring).
        self._admit: asyncio.Semaphore | None = None
        self._admit_wait_s = 0.0

    @property
    def cluster(self) -> bool:
        """Whether ``connect`` found a Redis Cluster behind the URL."""
        return isinstance(self._redis, RedisCluster)

    @classmethod
    async def connect(
        cls, url: str | None, *, data_dir: Path, socket_timeout_s: float = 2.0, max_connections: int = 64
    ) -> SessionStore:
        """Connect to ``url``, or with ``url=None`` start an embedded Redis under ``data_dir``.

        Pings, recognises a Redis Cluster (see the module docstring) and loads the scripts; raises
        ``StoreUnavailable`` if Redis does not answer. At most ``max_connections`` connections (per
        node, in a cluster): more concurrent callers wait for a free one (up to the socket timeout)
        instead of failing, so a burst of requests queues.
        """
        embedded = None
        if url is None:
            embedded = EmbeddedRedis(data_dir)
            await asyncio.to_thread(embedded.start)
            url = embedded.url
        elif not url.startswith(SCHEMES):
            raise ValueError(f"Redis URL {url!r} must start with one of {', '.join(SCHEMES)}")
        store: SessionStore | None = None
        try:
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
                retry_on_error=list(_RETRY_ON),
            )
            client = aioredis.Redis.from_pool(pool)  # owns the pool: aclose() closes it
            store = cls(client, embedded=embedded)
            try:
                await store.ping()
            except ResponseError as e:  # not an outage: e.g. a database the server lacks (a cluster has only 0)
                raise ValueError(f"Redis at {url!r} refused the connection: {e}") from None
            if embedded is None and await store._is_cluster_node():
                await store._switch_to_cluster(url, socket_timeout_s=socket_timeout_s, max_connections=max_connections)
            await store._load_scripts()
        except BaseException:
            if store is not None:
                await store.close()
            elif embedded is not None:
                await asyncio.to_thread(embedded.stop)
            raise
        return store

    async def close(self) -> None:
        """Close the pool; stop the embedded Redis if this store owns one (clean SHUTDOWN)."""
        try:
            await self._redis.aclose()
        finally:
            if self.embedded is not None:
                await asyncio.to_thread(self.embedded.stop)

    async def ping(self) -> None:
        """PING the Redis, or every primary of a cluster."""
        self.round_trips += 1
        async with self._op():
            if isinstance(self._redis, RedisCluster):
                await self._redis.ping(target_nodes=RedisCluster.PRIMARIES)
            else:
                await self._redis.ping()

    async def create(self, record: SessionRecord) -> bool:
        """Create iff the key does not exist (False if it does). ``revision`` is stored as given."""
        _check(record)
        args = [record.ttl_s * 1000, secrets.token_hex(8), *_encode(record)]
        [created] = await self._run([(_SCRIPTS["create"], session_key(record.session_id), args)])
        return bool(created)

    async def load(self, ids: Sequence[str], *, with_reply: bool = False) -> list[SessionRecord | None]:
        """Records in ``ids`` order (None where missing), one round trip; refreshes each TTL.

        ``last_reply`` comes back empty unless ``with_reply`` (see ``_LOAD``).
        """
        keys = [session_key(i) for i in ids]
        flag = "1" if with_reply else "0"
        replies = await self._run([(_SCRIPTS["load"], k, (flag,)) for k in keys])
        return [None if r is None else _decode(k, r[0], int(r[1])) for k, r in zip(keys, replies, strict=True)]

    async def save(self, writes: Sequence[tuple[SessionRecord, int]]) -> list[WriteOutcome]:
        """Compare-and-set each ``(new_record, expected_revision)``; one round trip for the batch.

        Applies iff the stored revision equals ``expected_revision`` (the new record's revision
        must be ``expected_revision + 1``); writes every field atomically and refreshes the TTL.
        """
        calls: list[_Call] = []
        for record, expected in writes:
            _check(record)
            if record.revision != expected + 1:
                raise ValueError(
                    f"session {record.session_id!r}: new revision {record.revision} "
                    f"must be expected revision {expected} + 1"
                )
            args = [expected, record.ttl_s * 1000, secrets.token_hex(8), record.revision, *_encode(record)]
            calls.append((_SCRIPTS["save"], session_key(record.session_id), args))
        outcomes = {1: WriteOutcome.OK, 0: WriteOutcome.CONFLICT, -1: WriteOutcome.MISSING}
        return [outcomes[int(r)] for r in await self._run(calls)]

    async def delete(self, session_id: str) -> bool:
        self.round_trips += 1
        async with self._op():
            return bool(await self._redis.delete(session_key(session_id)))

    async def count(self) -> int:
        """Number of session keys, by SCAN (O(all keys), one round trip per 1000 keys scanned); in a
        cluster, SCAN of every primary, the primaries in parallel."""
        if isinstance(self._redis, RedisCluster):
            cluster = self._redis
            async with self._op():
                await cluster.initialize()  # a no-op, unless a failure made redis-py drop the topology
                counts = await asyncio.gather(*(self._count_on(cluster, node) for node in cluster.get_primaries()))
            return sum(counts)
        seen: set[bytes | str] = set()  # SCAN may return a key twice while the keyspace resizes
        cursor = 0
        while True:
            self.round_trips += 1
            async with self._op():
                cursor, keys = await self._redis.scan(cursor, match=_PATTERN, count=1000)
            seen.update(keys)
            if cursor == 0:
                return len(seen)

    # -- internals ------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _op(self) -> AsyncIterator[None]:
        """One operation against Redis: admitted (cluster mode only), its errors translated."""
        if self._admit is None:
            async with _translate():
                yield
            return
        try:
            async with asyncio.timeout(self._admit_wait_s):
                await self._admit.acquire()
        except TimeoutError:
            raise StoreUnavailable(f"no free Redis connection within {self._admit_wait_s:g} s") from None
        try:
            async with _translate():
                yield
        finally:
            self._admit.release()

    async def _is_cluster_node(self) -> bool:
        """``INFO cluster`` says ``cluster_enabled:1``; where INFO is refused (renamed, ACL), whether
        ``CLUSTER INFO`` answers (a single Redis refuses it: cluster support disabled)."""
        self.round_trips += 1
        try:
            async with self._op():
                info = await self._redis.info("cluster")
            return str(info.get("cluster_enabled", "0")) == "1"
        except ResponseError as e:
            log.debug("INFO cluster refused (%s); asking CLUSTER INFO", e)
        self.round_trips += 1
        try:
            async with self._op():
                await self._redis.execute_command("CLUSTER INFO")
            return True
        except ResponseError:
            return False

    async def _switch_to_cluster(self, url: str, *, socket_timeout_s: float, max_connections: int) -> None:
        """Replace the single-node client by a ``RedisCluster`` started from the URL's node."""
        if url.startswith("unix://"):
            raise ValueError(
                f"Redis URL {url!r} is a Redis Cluster node: give its redis:// or rediss:// URL "
                "(a cluster client reaches the nodes over TCP)"
            )
        try:
            cluster = RedisCluster.from_url(
                url,
                max_connections=max_connections,  # per node; _op admits that many operations at a time
                decode_responses=False,
                socket_timeout=socket_timeout_s,
                socket_connect_timeout=socket_timeout_s,
                # How many times redis-py re-discovers the topology and retries after a connection
                # error, a timeout or CLUSTERDOWN (MOVED/ASK/TRYAGAIN have their own redirections).
                retry=Retry(ExponentialBackoff(cap=0.25, base=0.025), retries=2),
            )
        except RedisClusterException as e:  # e.g. a database other than 0 in the URL
            raise ValueError(f"Redis URL {url!r} is a Redis Cluster node, but: {e}") from None
        single, self._redis = self._redis, cluster
        self._admit = asyncio.Semaphore(max_connections)
        self._admit_wait_s = socket_timeout_s
        await single.aclose()
        self.round_trips += 1
        async with self._op():
            await cluster.initialize()  # CLUSTER SLOTS: the nodes and which slots each one serves

    async def _count_on(self, cluster: RedisCluster, node: ClusterNode) -> int:
        seen: set[bytes | str] = set()
        cursor = 0
        while True:
            self.round_trips += 1
            reply: Any = await cluster.scan(cursor, match=_PATTERN, count=1000, target_nodes=node)
            cursors, keys = reply  # redis-py merges per-node SCAN replies: ({node name: cursor}, keys)
            cursor = int(cursors[node.name] if isinstance(cursors, dict) else cursors)
            seen.update(keys)
            if cursor == 0:
                return len(seen)

    async def _load_scripts(self) -> None:
        if isinstance(self._redis, RedisCluster):
            # The script cache is per node: SCRIPT LOAD goes to every primary (in parallel), one script
            # at a time so that an operation never holds more than one connection per node.
            cluster = self._redis
            shas = []
            for script in _SCRIPTS.values():
                self.round_trips += 1
                async with self._op():
                    load = cluster.execute_command("SCRIPT LOAD", script.source, target_nodes=RedisCluster.PRIMARIES)
                    shas.append(await load)
        else:
            self.round_trips += 1
            async with self._op():
                pipe = self._redis.pipeline(transaction=False)
                for script in _SCRIPTS.values():
                    pipe.script_load(script.source)
                shas = await pipe.execute()
        for script, reply in zip(_SCRIPTS.values(), shas, strict=True):
            # A cluster's reply is one SHA, or per node ({node name: sha}) in some redis-py versions.
            for sha in reply.values() if isinstance(reply, dict) else (reply,):
                if (sha.decode() if isinstance(sha, bytes) else sha) != script.sha:
                    raise RuntimeError(f"Redis hashed script {script.name!r} to {sha!r}, not {script.sha}")

    async def _run(self, calls: Sequence[_Call]) -> list[Any]:
        """EVALSHA every call in one pipeline; after NOSCRIPT, load the scripts and re-send only the
        refused calls (which did nothing). Returns the replies in order."""
        replies: list[Any] = [None] * len(calls)
        pending = list(range(len(calls)))
        for attempt in range(3):
            if not pending:
                break
            if attempt:
                await self._load_scripts()
            # One round trip; in a cluster, one per node involved, sent in parallel (redis-py groups
            # the pipeline's commands by the node that serves each key's slot).
            self.round_trips += 1
            async with self._op():
                pipe = self._redis.pipeline(transaction=False)
                for i in pending:
                    script, key, args = calls[i]
                    # execute_command, not pipe.evalsha: redis-py's cluster pipeline blocks the evalsha
                    # method (redis-py #2914) but routes a queued EVALSHA by its key like any command.
                    pipe.execute_command("EVALSHA", script.sha, 1, key, *args)
                results = await pipe.execute(raise_on_error=False)
            refused = []
            for i, r in zip(pending, results, strict=True):
                if isinstance(r, NoScriptError):
                    refused.append(i)
                elif isinstance(r, Exception):
                    if _is_unavailable_reply(r):
                        raise _unavailable(r) from r
                    raise r
                else:
                    replies[i] = r
            pending = refused
        if pending:
            raise StoreUnavailable("Redis keeps forgetting the store's scripts (SCRIPT FLUSH in a loop?)")
        return replies
