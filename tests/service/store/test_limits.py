"""The store's per-owner limits and its O(1) session index (service/store/limits.py, counting.py)
against a real Redis: the token bucket, counts across create / delete / expiry, the limits
enforced atomically, two stores (replicas) sharing one Redis."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import redis

from service.errors import TooManySessions
from service.store import counting
from service.store.store import SessionRecord, SessionStore, session_key
from tests.redis_cluster_fixture import running_cluster


def record(session_id: str, owner: str = "", ttl_s: int = 60) -> SessionRecord:
    now = time.time()
    return SessionRecord(session_id, "m", "f" * 64, 0, 1, (b"\0" * 8,), owner, now, now, ttl_s)


@pytest.fixture
def raw(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


async def counts(store: SessionStore, owner: str = "") -> tuple[int, int]:
    tally = await store.count_sessions(owner)
    return tally.total, tally.owned


# -- the token bucket -------------------------------------------------------------------------------
async def test_bucket_allows_the_burst_then_says_when(store: SessionStore) -> None:
    assert [await store.take_token("a", 2.0, 3) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = await store.take_token("a", 2.0, 3)
    assert 0 < wait <= 0.5  # 2 tokens/s: one back within half a second
    assert await store.take_token("b", 2.0, 3) == 0.0  # another owner has its own bucket
    await asyncio.sleep(wait + 0.05)
    assert await store.take_token("a", 2.0, 3) == 0.0
    assert await store.take_token("a", 2.0, 3) > 0


async def test_bucket_is_shared_by_replicas(store: SessionStore, redis_url: str) -> None:
    other = await SessionStore.connect(redis_url)
    try:
        taken = [await s.take_token("shared", 1.0, 4) for s in (store, other, store, other, store, other)]
    finally:
        await other.close()
    assert [t == 0.0 for t in taken] == [True] * 4 + [False] * 2


async def test_bucket_key_expires_when_idle(store: SessionStore, raw: redis.Redis) -> None:
    await store.take_token("idle", 10.0, 5)
    [key] = raw.keys("carryover:{rate:*")
    assert 0 < raw.pttl(key) <= 1500  # a full bucket refills in 0.5 s, plus a second


# -- the index --------------------------------------------------------------------------------------
async def test_counts_follow_create_and_delete(store: SessionStore) -> None:
    assert await counts(store, "o1") == (0, 0)
    for i in range(3):
        assert await store.create(record(f"o1:{i}", "o1"))
    assert await store.create(record("o2:0", "o2"))
    assert not await store.create(record("o1:0", "o1"))  # exists: counted once
    assert await counts(store, "o1") == (4, 3)
    assert await counts(store, "o2") == (4, 1)
    assert await store.delete("o1:0", "o1")
    assert not await store.delete("o1:0", "o1")  # a second delete uncounts nothing
    assert await counts(store, "o1") == (3, 2)
    assert await store.count() == 3  # the SCAN audit agrees


async def test_expired_sessions_leave_the_count(store: SessionStore, raw: redis.Redis) -> None:
    await store.create(record("short", "o", ttl_s=1))
    await store.create(record("long", "o", ttl_s=60))
    assert await counts(store, "o") == (2, 2)
    await asyncio.sleep(1.2)
    assert raw.exists(session_key("short")) == 0
    assert await counts(store, "o") == (1, 1)
    assert raw.zcard(counting.INDEX_KEYS[0]) == 1


async def test_a_live_session_past_its_first_score_is_kept(store: SessionStore, raw: redis.Redis) -> None:
    await store.create(record("kept", "o", ttl_s=60))
    raw.zadd(counting.INDEX_KEYS[0], {counting.member("o", "kept"): 0})  # due now, as after RECHECK_MS
    assert await counts(store, "o") == (1, 1)
    score = raw.zscore(counting.INDEX_KEYS[0], counting.member("o", "kept"))
    assert score is not None and score > time.time() * 1000 + 50_000  # moved to now + PTTL


async def test_limits_are_enforced_and_free_again(store: SessionStore) -> None:
    for i in range(2):
        await store.create(record(f"a{i}", "a"), max_per_owner=2)
    with pytest.raises(TooManySessions, match="API key holds its limit of 2") as info:
        await store.create(record("a2", "a"), max_per_owner=2)
    assert info.value.retry_after == 1.0
    await store.create(record("b0", "b"), max_sessions=3, max_per_owner=2)  # another owner still may
    with pytest.raises(TooManySessions, match="server holds its limit of 3"):
        await store.create(record("b1", "b"), max_sessions=3)
    await store.delete("a0", "a")
    await store.create(record("a2", "a"), max_sessions=3, max_per_owner=2)
    assert await counts(store, "a") == (3, 2)


async def test_a_full_server_reconciles_before_refusing(store: SessionStore) -> None:
    await store.create(record("gone", ttl_s=1), max_sessions=1)
    await asyncio.sleep(1.2)
    # Its score passed (min(ttl, RECHECK_MS)): the refusal path tallies, finds it gone, admits.
    assert await store.create(record("new"), max_sessions=1)
    assert await counts(store) == (1, 1)


async def test_racing_replicas_never_overshoot(store: SessionStore, redis_url: str) -> None:
    other = await SessionStore.connect(redis_url)
    try:

        async def attempt(s: SessionStore, i: int) -> bool:
            try:
                return await s.create(record(f"r{i}", "o"), max_per_owner=5)
            except TooManySessions:
                return False

        results = await asyncio.gather(*(attempt((store, other)[i % 2], i) for i in range(20)))
        assert sum(results) == 5
        assert await counts(other, "o") == (5, 5)
    finally:
        await other.close()


async def test_index_and_bucket_work_in_a_cluster(tmp_path: Path) -> None:
    """Sessions spread over three primaries; the index is one slot, every script stays atomic."""
    with running_cluster(tmp_path / "cluster") as cluster:
        s = await SessionStore.connect(cluster.url)
        try:
            for i in range(12):
                await s.create(record(f"o:{i}", "o", ttl_s=1 if i < 4 else 60), max_per_owner=12)
            assert len({cluster.node_of(session_key(f"o:{i}")).port for i in range(12)}) > 1
            with pytest.raises(TooManySessions):
                await s.create(record("o:12", "o"), max_per_owner=12)
            assert await s.delete("o:11", "o")
            assert await counts(s, "o") == (11, 11)
            await asyncio.sleep(1.2)
            assert await counts(s, "o") == (7, 7) and await s.count() == 7
            assert [await s.take_token("o", 1.0, 2) == 0.0 for _ in range(3)] == [True, True, False]
        finally:
            await s.close()
