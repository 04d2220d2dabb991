"""redis-py's exceptions and error replies → ``StoreUnavailable`` (the 503 every transport shows).

Only "this Redis cannot serve us right now" becomes ``StoreUnavailable``; anything else (a bad
command, a bug) propagates unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from redis.exceptions import (
    AskError,
    BusyLoadingError,
    ClusterDownError,
    ClusterError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.errors import StoreFull, StoreUnavailable

# Retried by redis-py on a fresh connection (with backoff) before we give up: a dropped socket,
# a restart, a failover. Writes are safe to re-send thanks to the write token.
RETRY_ON: tuple[type[Exception], ...] = (RedisConnectionError, RedisTimeoutError, BusyLoadingError, OSError)

# Replies that mean "this Redis cannot serve us right now" rather than "you sent a bad command".
# In a cluster pipeline a node's failure also comes back as a reply (the other nodes' parts of the
# batch still ran): a connection error or timeout, ``MOVED``/``ASK`` left over after redis-py's
# redirections (``AskError`` covers ``MovedError``), ``ClusterError`` ("TTL exhausted"), or a
# ``RedisClusterException`` (e.g. a slot no node covers).
_UNAVAILABLE_REPLIES = (
    *(ReadOnlyError, ClusterDownError, TryAgainError, OutOfMemoryError),
    *(AskError, ClusterError, RedisClusterException, RedisConnectionError, RedisTimeoutError, OSError),
)


def unavailable(e: BaseException) -> StoreUnavailable:
    """The ``StoreUnavailable`` for a redis-py failure (a longer Retry-After while Redis loads;
    ``StoreFull``, 507, when it is out of memory)."""
    if isinstance(e, OutOfMemoryError):  # maxmemory + noeviction: the write was refused whole
        return StoreFull(
            "the session store is full: Redis refused the write at its maxmemory limit (policy noeviction); "
            "stored sessions are kept, writes fail until memory is freed or maxmemory is raised",
            retry_after=5.0,
        )
    if isinstance(e, BusyLoadingError):
        return StoreUnavailable(f"Redis is loading its data: {e}", retry_after=2.0)
    return StoreUnavailable(f"Redis unavailable: {type(e).__name__}: {e}")


def is_unavailable_reply(r: object) -> bool:
    """Whether a pipeline reply (or exception) means an outage rather than a bad command."""
    # BUSY: another client's script is running past lua-time-limit.
    return isinstance(r, _UNAVAILABLE_REPLIES) or (isinstance(r, ResponseError) and str(r).startswith("BUSY"))


@contextlib.asynccontextmanager
async def translated() -> AsyncIterator[None]:
    """Raise outages inside the block as ``StoreUnavailable``; let every other error through."""
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError, OSError) as e:  # OSError covers asyncio timeouts
        raise unavailable(e) from e
    except (ClusterError, RedisClusterException) as e:  # cluster down, TTL exhausted, slots not covered
        raise unavailable(e) from e
    except ResponseError as e:
        if is_unavailable_reply(e):
            raise unavailable(e) from e
        raise
