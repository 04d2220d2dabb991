"""Populated copies of a real record are sessions like any other: counted, limited, loaded under their own id."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace

import pytest
import redis

from bench.populate import Template, gone, indexed, populate
from service.errors import TooManySessions
from service.sessions import new_session_id
from service.store.record import SessionRecord, session_key
from service.store.store import SessionStore


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    client.config_set("rdbcompression", "no")  # what bench.scale runs its Redis with
    yield client
    client.config_set("rdbcompression", "yes")  # the shared test Redis's default again
    client.close()


def a_record(session_id: str) -> SessionRecord:
    now = time.time()
    return SessionRecord(
        session_id=session_id,
        model="charlm",
        fingerprint="ab" * 32,
        step=3,
        revision=2,
        states=(bytes(range(256)) * 8,),
        owner="",
        created_at=now,
        updated_at=now,
        ttl_s=600,
    )


async def test_copies_are_counted_limited_and_loaded_as_their_own_sessions(
    store: SessionStore, raw: redis.Redis
) -> None:
    original = a_record(new_session_id())
    assert await store.create(original)
    key = session_key(original.session_id)
    payload = raw.dump(key)
    assert isinstance(payload, bytes)
    template = Template(original.session_id, payload, int(raw.pttl(key)), original.step)

    ids, _ = populate(raw, template, 50, batch=20)

    tally = await store.count_sessions()
    assert tally.total == tally.owned == 51 and indexed(raw) == (51, 51)
    loaded = await store.load(ids[:3])
    assert [r.session_id for r in loaded if isinstance(r, SessionRecord)] == ids[:3]
    assert all(isinstance(r, SessionRecord) and r.states == original.states and r.step == 3 for r in loaded)
    # an idle session expires: the load refreshed it to the record's full TTL, never more
    assert 0 < int(raw.pttl(session_key(ids[0]))) <= original.ttl_s * 1000
    with pytest.raises(TooManySessions):
        await store.create(replace(original, session_id=new_session_id()), max_sessions=51)


async def test_expired_copies_leave_the_count(store: SessionStore, raw: redis.Redis) -> None:
    original = a_record(new_session_id())
    assert await store.create(original)
    key = session_key(original.session_id)
    payload = raw.dump(key)
    assert isinstance(payload, bytes)

    ids, _ = populate(raw, Template(original.session_id, payload, 600_000, 3), 30, ttl_ms=200)
    time.sleep(0.4)

    assert gone(raw, ids)
    assert (await store.count_sessions()).total == 1 and indexed(raw) == (1, 1)
