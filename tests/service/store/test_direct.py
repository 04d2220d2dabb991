"""Commands sent straight on parked connections: replies in order, errors in place, no desync."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ResponseError

from service.store.direct import DirectCommands
from service.store.packing import connection_class
from service.store.translate import RETRY_ON
from tests.redis_fixture import RedisServer


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    pool = aioredis.BlockingConnectionPool.from_url(
        redis_url,
        connection_class=connection_class(redis_url),
        max_connections=16,
        retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), retries=2),
        retry_on_error=list(RETRY_ON),
    )
    c = aioredis.Redis.from_pool(pool)
    yield c
    await c.aclose()


async def test_replies_in_order_with_error_replies_in_place(client: aioredis.Redis) -> None:
    direct = DirectCommands(client.connection_pool)
    await client.set("s", b"v")
    replies = await direct.pipeline([("ECHO", b"a"), ("HGET", "s", "f"), ("GET", "s"), ("INCR", "n")])
    assert replies[0] == b"a" and replies[2] == b"v" and replies[3] == 1
    assert isinstance(replies[1], ResponseError) and "WRONGTYPE" in str(replies[1])
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await direct.call("HGET", "s", "f")
    assert await direct.call("GET", "s") == b"v"  # the connection that carried the error is fine


async def test_a_call_cancelled_mid_read_leaves_no_stale_reply(client: aioredis.Redis) -> None:
    direct = DirectCommands(client.connection_pool)
    await direct.call("PING")  # one connection parked
    slow = asyncio.create_task(direct.call("BLPOP", "never", "0.3"))
    await asyncio.sleep(0.05)
    slow.cancel()
    with pytest.raises(asyncio.CancelledError):
        await slow
    # A reused connection with BLPOP's reply still due would answer this ECHO with it.
    assert [await direct.call("ECHO", b"x%d" % i) for i in range(3)] == [b"x0", b"x1", b"x2"]
    await asyncio.sleep(0.35)
    assert await direct.call("ECHO", b"after") == b"after"


async def test_a_killed_connection_is_retried_on_a_fresh_one(client: aioredis.Redis) -> None:
    direct = DirectCommands(client.connection_pool)
    my_id = await direct.call("CLIENT", "ID")  # the parked connection's id
    await client.execute_command("CLIENT", "KILL", "ID", my_id)  # type: ignore[no-untyped-call]
    assert await direct.call("ECHO", b"again") == b"again"
    assert await direct.call("CLIENT", "ID") != my_id


async def test_parks_at_most_a_quarter_of_the_pool(redis_url: str) -> None:
    pool = aioredis.BlockingConnectionPool.from_url(redis_url, max_connections=3, timeout=1)
    c = aioredis.Redis.from_pool(pool)
    try:
        direct = DirectCommands(pool)
        assert await asyncio.gather(*(direct.call("ECHO", b"%d" % i) for i in range(20))) == [
            b"%d" % i for i in range(20)
        ]
        assert await c.ping()  # no connection is parked away from redis-py's own calls
    finally:
        await c.aclose()


async def test_a_hung_redis_times_out_on_a_parked_connection(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    pool = aioredis.BlockingConnectionPool.from_url(
        server.url, socket_timeout=0.2, retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), retries=1)
    )
    c = aioredis.Redis.from_pool(pool)
    try:
        direct = DirectCommands(pool)
        assert await direct.call("PING")  # parked now, without its own socket timeout
        server.pause()
        try:
            started = time.monotonic()
            with pytest.raises(OSError):  # asyncio's TimeoutError: the store reports it as unavailable
                await direct.call("PING")
            assert time.monotonic() - started < 5
        finally:
            server.resume()
        assert await direct.call("ECHO", b"back") == b"back"
    finally:
        await c.aclose()
        server.stop()
