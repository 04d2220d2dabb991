"""The hiredis packer sends exactly the bytes redis-py's own packer would."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection

from service.store.packing import (
    HiredisConnection,
    HiredisSSLConnection,
    HiredisUnixConnection,
    connection_class,
)

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
