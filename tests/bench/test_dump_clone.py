"""Copies of a real Redis DUMP payload with another id inside: RESTORE accepts them, nothing else changes."""

from __future__ import annotations

import pytest
import redis

from bench.dump_clone import CHECK, DumpCloner, crc64


def test_crc64_is_the_one_redis_uses() -> None:
    assert crc64(CHECK[0]) == CHECK[1]


def test_a_clone_restores_with_the_new_id_and_every_other_field_unchanged(redis_url: str) -> None:
    raw = redis.Redis.from_url(redis_url)
    raw.config_set("rdbcompression", "no")  # DUMP then leaves the id readable
    try:
        old, new = "A" * 22, "b" * 21 + "Z"
        meta, state = f'{{"session_id":"{old}","step":1}}', bytes(range(256)) * 8
        raw.hset("template", mapping={"meta": meta, "s0": state, "revision": "3"})
        payload = raw.dump("template")
        assert isinstance(payload, bytes)

        raw.restore("copy", 0, DumpCloner(payload, old.encode()).clone(new.encode()))

        copy = raw.hgetall("copy")
        assert copy[b"meta"] == meta.replace(old, new).encode()
        assert copy[b"s0"] == state and copy[b"revision"] == b"3"
    finally:
        raw.config_set("rdbcompression", "yes")  # the shared test Redis's default again


def test_refuses_what_it_cannot_patch(redis_url: str) -> None:
    raw = redis.Redis.from_url(redis_url)
    raw.set("k", "no id here")
    payload = raw.dump("k")
    assert isinstance(payload, bytes)
    with pytest.raises(ValueError, match="occurs 0 times"):
        DumpCloner(payload, b"A" * 22)
    with pytest.raises(ValueError, match="checksum"):
        DumpCloner(payload[:-1] + bytes([payload[-1] ^ 1]), b"A" * 22)
    cloner = DumpCloner(payload, b"no id")
    with pytest.raises(ValueError, match="5 bytes"):
        cloner.clone(b"longer id")
