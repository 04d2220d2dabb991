"""The hiredis packer sends exactly the bytes redis-py's own packer would."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection

from service.store.packing import (
    HiredisConnection,
    HiredisSSLConnection,
    HiredisUnixConnection,
    connection_class,
)
from service.store.store import SessionStore
from tests.redis_fixture import RedisServer

COMMANDS: list[tuple[Any, ...]] = [
    ("PING",),
    ("SCRIPT LOAD", "return 1"),
    ("EVALSHA", "a" * 40, 1, "carryover:{x}:s", "0", "3", b"\x00\x01\xff" * 1000, "h\u00e9llo"),
    ("HSET", "k", "meta", b'{"step": 12}', "s0", bytes(range(256)), "n", 12345678901234),
    ("SCAN", 0, "MATCH", "carryover:{*}:s", "COUNT", 1000),
]


@pytest.mark.parametrize("args", COMMANDS)
def test_same_bytes_as_redis_py(args: tuple[Any, ...]) -> None:
    ours = b"".join(HiredisConnection().pack_command(*args))
    theirs = b"".join(Connection().pack_command(*args))
    assert ours == theirs


def test_the_class_follows_the_url_scheme() -> None:
    assert (
        issubclass(connection_class("redis://h:1/0"), Connection) and connection_class("redis://h") is HiredisConnection
    )
    assert connection_class("rediss://h") is HiredisSSLConnection and issubclass(HiredisSSLConnection, SSLConnection)
    assert connection_class("unix:///tmp/r.sock") is HiredisUnixConnection
    assert issubclass(HiredisUnixConnection, UnixDomainSocketConnection)


async def _live_connection_class(url: str) -> type:
    store = await SessionStore.connect(url)
    try:
        pool = store._single().connection_pool
        connection = await pool.get_connection()  # type: ignore[no-untyped-call]
        await pool.release(connection)
        return type(connection)
    finally:
        await store.close()


async def test_a_connected_store_packs_with_hiredis_over_tcp(redis_url: str) -> None:
    assert await _live_connection_class(redis_url) is HiredisConnection


async def test_a_connected_store_packs_with_hiredis_over_a_unix_socket(tmp_path: Path) -> None:
    # redis-py's URL parser sets its own class for unix:// (and rediss://): the store must win.
    socket_path = tmp_path / "r.sock"
    server = RedisServer(tmp_path, extra_args=("--unixsocket", str(socket_path), "--unixsocketperm", "700"))
    server.start()
    try:
        assert await _live_connection_class(f"unix://{socket_path}") is HiredisUnixConnection
    finally:
        server.stop()
