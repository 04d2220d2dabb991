"""SessionStore against real redis-server processes (docs/contract.md §2)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import orjson
import pytest
import redis

from service.errors import SessionCorrupt, StoreUnavailable
from service.store import store as store_module
from service.store.record import replay_key
from service.store.store import SessionRecord, SessionStore, WriteOutcome, session_key
from tests.redis_fixture import RedisServer

# Fixtures and tests share the session loop (fixtures default to it in pyproject).
pytestmark = pytest.mark.asyncio(loop_scope="session")

REPO = Path(__file__).resolve().parents[3]


def present(loaded: Sequence[SessionRecord | SessionCorrupt | None]) -> list[SessionRecord]:
    """The records that exist (typed for the tests that read their fields)."""
    return [r for r in loaded if isinstance(r, SessionRecord)]


def record(
    sid: str,
    *,
    revision: int = 1,
    step: int = 0,
    ttl_s: int = 600,
    states: tuple[bytes, ...] = (b"\x00\x01\x02\xff", b"h" * 16),
) -> SessionRecord:
    now = time.time()
    return SessionRecord(
        session_id=sid,
        model="gru",
        fingerprint="ab" * 32,
        step=step,
        revision=revision,
        states=states,
        owner="owner-hash",
        created_at=now,
        updated_at=now,
        ttl_s=ttl_s,
    )


def advanced(rec: SessionRecord, steps: int = 3) -> SessionRecord:
    """The next write of ``rec``: CAS from its revision; states and reply derived from the revision so
    a reader can check that a record is whole."""
    rev = rec.revision + 1
    return replace(
        rec,
        revision=rev,
        step=rec.step + steps,
        states=consistent_states(rev),
        last_digest=f"d{rev}",
        last_reply=b"r%d" % rev,
        updated_at=time.time(),
        expires_in=None,
    )


def consistent_states(rev: int, size: int = 4096) -> tuple[bytes, ...]:
    return (rev.to_bytes(8, "little") * (size // 8), (rev * 7).to_bytes(8, "little") * 4)


def assert_whole(rec: SessionRecord, steps: int = 3) -> None:
    if rec.revision == 1:
        return
    assert rec.step == (rec.revision - 1) * steps
    assert rec.states == consistent_states(rec.revision)
    assert (rec.last_digest, rec.last_reply) == (f"d{rec.revision}", b"r%d" % rec.revision)


@pytest.fixture
def raw(redis_server: RedisServer) -> redis.Redis:
    return redis_server.client()


def gone(pid: int) -> bool:
    """Exited (a zombie left for a non-reaping init counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False


# -- records, batches, TTL ----------------------------------------------------------------------


async def test_create_once_and_read_back_every_field(store: SessionStore, raw: redis.Redis) -> None:
    rec = replace(
        record("a/é"),
        states=(b"", b"\x00" * 3, bytes(range(256))),
        last_digest="x",
        created_at=1712345678.123456,
        updated_at=1712345679.5,
    )
    assert await store.create(rec)
    assert not await store.create(replace(rec, model="other"))  # exists: untouched
    [got] = await store.load([rec.session_id], with_reply=True)
    assert isinstance(got, SessionRecord)
    assert got is not None and got.expires_in is not None and 599 < got.expires_in <= 600
    assert replace(got, expires_in=None) == rec
    stored = raw.hgetall(session_key("a/é"))
    assert stored[b"revision"] == b"1" and stored[b"s2"] == bytes(range(256))
    meta = orjson.loads(stored[b"meta"])
    assert meta["step"] == 0 and meta["created_at"] == 1712345678.123456


async def test_batch_loads_leave_the_replay_outputs_out(store: SessionStore, raw: redis.Redis) -> None:
    rec = record("lean")
    assert await store.create(replace(rec, last_reply=b"ignored"))  # a new session keeps no replay copy
    assert not raw.exists(replay_key("lean"))
    assert await store.save([(replace(advanced(rec), last_reply=b"x" * 1000), 1)]) == [WriteOutcome.OK]
    [lean] = await store.load(["lean"])
    [full] = await store.load(["lean"], with_reply=True)
    assert isinstance(lean, SessionRecord) and isinstance(full, SessionRecord)
    assert (lean.last_reply, lean.last_digest, full.last_reply) == (b"", "d2", b"x" * 1000)
    assert b"last_reply" not in raw.hgetall(session_key("lean"))  # apart from the state
    assert raw.get(replay_key("lean")) == b"x" * 1000


async def test_the_replay_copy_lives_for_the_window_and_a_write_without_one_deletes_it(
    store: SessionStore, raw: redis.Redis
) -> None:
    rec = record("window")
    assert await store.create(rec)
    first = replace(advanced(rec), last_reply=b"out")
    assert await store.save([(first, 1)], replay_window_s=0.3) == [WriteOutcome.OK]
    assert 0 < raw.pttl(replay_key("window")) <= 300  # its own short TTL, not the session's
    [got] = await store.load(["window"], with_reply=True)
    assert isinstance(got, SessionRecord) and got.last_reply == b"out"
    await asyncio.sleep(0.4)  # past the window: the copy is gone, the state is not
    [late] = await store.load(["window"], with_reply=True)
    assert isinstance(late, SessionRecord) and (late.last_reply, late.last_digest, late.step) == (b"", "d2", 3)

    second = replace(advanced(first), last_reply=b"again")
    assert await store.save([(second, 2)]) == [WriteOutcome.OK]
    assert raw.exists(replay_key("window"))
    third = replace(advanced(second), last_reply=b"", last_digest="")  # e.g. no `step`, or over the cap
    assert await store.save([(third, 3)]) == [WriteOutcome.OK]
    assert not raw.exists(replay_key("window"))  # never a copy of an older write


async def test_garbage_under_the_replay_key_reads_as_no_copy(store: SessionStore, raw: redis.Redis) -> None:
    rec = record("junk")
    assert await store.create(rec)
    raw.rpush(replay_key("junk"), b"x")
    [got] = await store.load(["junk"], with_reply=True)
    assert isinstance(got, SessionRecord) and got.last_reply == b""
    assert await store.save([(replace(advanced(rec), last_reply=b"y"), 1)]) == [WriteOutcome.OK]
    assert raw.get(replay_key("junk")) == b"y"


async def test_load_and_save_a_batch_are_one_round_trip_each(store: SessionStore) -> None:
    ids = [f"s{i}" for i in range(10)]
    for sid in ids[:8]:
        assert await store.create(record(sid))
    before = store.round_trips
    loaded = await store.load(ids)
    assert store.round_trips == before + 1
    assert [r.session_id if isinstance(r, SessionRecord) else None for r in loaded] == [*ids[:8], None, None]

    more = [record(sid) for sid in ids[8:]]
    for r in more:
        await store.create(r)
    writes = [(advanced(r), r.revision) for r in [*(r for r in present(loaded)), *more]]
    before = store.round_trips
    assert await store.save(writes) == [WriteOutcome.OK] * 10
    assert store.round_trips == before + 1
    assert [r.revision if isinstance(r, SessionRecord) else 0 for r in await store.load(ids)] == [2] * 10

    before = store.round_trips
    assert await store.load([]) == [] and await store.save([]) == []
    assert store.round_trips == before


async def test_load_and_save_refresh_the_ttl(store: SessionStore, raw: redis.Redis) -> None:
    rec = record("ttl", ttl_s=100)
    await store.create(rec)
    key = session_key("ttl")
    assert 99_000 < raw.pttl(key) <= 100_000
    raw.pexpire(key, 5_000)
    [got] = await store.load(["ttl"])
    assert isinstance(got, SessionRecord)
    assert got is not None and got.expires_in is not None and got.expires_in > 99
    assert raw.pttl(key) > 99_000
    raw.pexpire(key, 5_000)
    assert await store.save([(advanced(got), got.revision)]) == [WriteOutcome.OK]
    assert raw.pttl(key) > 99_000
    # A save may change the TTL (the record carries it).
    [got] = await store.load(["ttl"])
    assert isinstance(got, SessionRecord)
    assert isinstance(got, SessionRecord)
    assert await store.save([(replace(advanced(got), ttl_s=7), got.revision)]) == [WriteOutcome.OK]
    assert 6_000 < raw.pttl(key) <= 7_000


async def test_cas_conflict_leaves_the_record_unchanged(store: SessionStore) -> None:
    rec = record("cas")
    await store.create(rec)
    first = advanced(rec)
    assert await store.save([(first, 1)]) == [WriteOutcome.OK]
    stale = replace(advanced(rec), step=99, states=(b"stale",))  # also read at revision 1
    assert await store.save([(stale, 1)]) == [WriteOutcome.CONFLICT]
    [got] = await store.load(["cas"], with_reply=True)
    assert isinstance(got, SessionRecord)
    assert got is not None and replace(got, expires_in=None) == first
    with pytest.raises(ValueError, match="revision"):
        await store.save([(replace(first, revision=5), 2)])


async def test_a_write_with_an_expected_token_applies_only_over_that_very_write(store: SessionStore) -> None:
    """ABA: a delete + re-create brings revision 1 back with a new write token; a writer that
    read the old revision 1 loses the CAS, one that read the new record wins."""
    rec = record("aba")
    await store.create(rec)
    [old] = present(await store.load(["aba"]))
    assert old.token  # the load decodes the write token ``w``
    await store.delete("aba", rec.owner)
    await store.create(rec)
    [new] = present(await store.load(["aba"]))
    assert (new.revision, new.token != old.token) == (1, True)
    [(outcome, _)] = await store.compare_and_set([(advanced(rec), 1, old.token, b"")])
    assert outcome is WriteOutcome.CONFLICT
    [(outcome, written)] = await store.compare_and_set([(advanced(rec), 1, new.token, b"")])
    [stored] = present(await store.load(["aba"]))
    assert (outcome, stored.revision, stored.token) == (WriteOutcome.OK, 2, written.token)
    [(outcome, _)] = await store.compare_and_set([(advanced(stored), 2, "", b"")])  # '' compares the revision only
    assert outcome is WriteOutcome.OK


async def test_a_write_keeps_a_fresh_token_of_its_own_and_never_reuses_the_one_it_replaces(
    store: SessionStore,
) -> None:
    """The caller may bring the write's token (the scheduler does, to spare a record copy); a
    record that still carries the token of the record it replaces (a copy of it) gets a new one,
    as does one with none, so every write is named by a token of its own."""
    await store.create(record("tok"))
    [base] = present(await store.load(["tok"]))
    [(outcome, written)] = await store.compare_and_set([(replace(advanced(base), token="mine"), 1, base.token, b"")])
    [stored] = present(await store.load(["tok"]))
    assert (outcome, written.token, stored.token) == (WriteOutcome.OK, "mine", "mine")
    copied = advanced(stored)  # ``replace`` of the stored record: still its token
    assert copied.token == "mine"
    [(outcome, written)] = await store.compare_and_set([(copied, 2, "mine", b"")])
    [stored] = present(await store.load(["tok"]))
    assert outcome is WriteOutcome.OK and written.token not in ("", "mine") and stored.token == written.token
    [(_, written)] = await store.compare_and_set([(replace(advanced(stored), token=""), 3, stored.token, b"")])
    assert written.token
    await store.save([(advanced(written), 4)])  # save draws a fresh one whatever the record carries
    [stored] = present(await store.load(["tok"]))
    assert stored.token not in ("", written.token)


async def test_the_replay_copy_comes_from_the_write_not_the_record(store: SessionStore) -> None:
    await store.create(record("rep"))
    [base] = present(await store.load(["rep"]))
    await store.compare_and_set([(replace(advanced(base), last_reply=b"ignored"), 1, base.token, b"kept")])
    [stored] = present(await store.load(["rep"], with_reply=True))
    assert stored.last_reply == b"kept"


async def test_deleted_session_is_missing(store: SessionStore) -> None:
    rec = record("gone")
    await store.create(rec)
    assert await store.delete("gone")
    assert not await store.delete("gone")
    assert await store.save([(advanced(rec), 1)]) == [WriteOutcome.MISSING]
    assert await store.load(["gone"]) == [None]
    assert await store.create(rec)  # and it can be created again


async def test_save_replaces_the_whole_record(store: SessionStore, raw: redis.Redis) -> None:
    rec = record("whole", states=(b"a", b"b", b"c"))
    await store.create(rec)
    assert await store.save([(replace(rec, revision=2, states=(b"x",)), 1)]) == [WriteOutcome.OK]
    fields = [k for k in raw.hkeys(session_key("whole")) if isinstance(k, bytes)]
    assert sorted(k for k in fields if k.startswith(b"s") and k[1:].isdigit()) == [b"s0"]
    [got] = await store.load(["whole"], with_reply=True)
    assert isinstance(got, SessionRecord)
    assert got is not None and got.states == (b"x",)


async def test_constants_are_written_at_create_and_kept_by_every_save(store: SessionStore, raw: redis.Redis) -> None:
    """Per-session constants (hash fields k0, ..., kshape) are sent once; a save never resends them."""
    rec = replace(record("consts"), constants=(b"m" * 24, b"v" * 8), constant_shapes=((3, 2), (2,)))
    await store.create(rec)
    assert await store.save([(replace(rec, revision=2, constants=(), constant_shapes=()), 1)]) == [WriteOutcome.OK]
    assert raw.hget(session_key("consts"), "k0") == b"m" * 24
    [got] = await store.load(["consts"])
    assert isinstance(got, SessionRecord) and got.revision == 2
    assert (got.constants, got.constant_shapes) == (rec.constants, rec.constant_shapes)
    [plain] = await store.load([(await _created(store, "plain")).session_id])
    assert isinstance(plain, SessionRecord) and (plain.constants, plain.constant_shapes) == ((), ())


async def _created(store: SessionStore, sid: str) -> SessionRecord:
    rec = record(sid)
    await store.create(rec)
    return rec


async def test_a_resent_write_is_recognised_by_its_token(store: SessionStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """redis-py re-sends a pipeline whose reply was lost; the write must not then read as lost."""
    rec = record("resend")
    monkeypatch.setattr(store_module, "new_write_token", lambda: "same-token")
    assert await store.create(rec)
    assert await store.create(rec)  # the "re-sent" create
    write = advanced(rec)
    assert await store.save([(write, 1)]) == [WriteOutcome.OK]
    assert await store.save([(write, 1)]) == [WriteOutcome.OK]  # the "re-sent" save
    monkeypatch.setattr(store_module, "new_write_token", lambda: "other-token")
    assert await store.save([(write, 1)]) == [WriteOutcome.CONFLICT]  # someone else's stale write
    assert not await store.create(rec)


async def test_two_stores_racing_on_one_revision(redis_url: str) -> None:
    a = await SessionStore.connect(redis_url)
    b = await SessionStore.connect(redis_url)
    try:
        await a.create(record("race"))
        for _ in range(100):
            [cur] = await a.load(["race"])
            assert isinstance(cur, SessionRecord)
            assert isinstance(cur, SessionRecord)
            mine, theirs = advanced(cur, 1), replace(advanced(cur, 2), last_digest="b")
            outcomes = await asyncio.gather(a.save([(mine, cur.revision)]), b.save([(theirs, cur.revision)]))
            assert sorted(o.value for [o] in outcomes) == ["conflict", "ok"]
        [final] = await b.load(["race"], with_reply=True)
        assert isinstance(final, SessionRecord)
        assert final is not None and final.revision == 101
    finally:
        await a.close()
        await b.close()


async def test_count(store: SessionStore, raw: redis.Redis) -> None:
    assert await store.count() == 0
    for i in range(5):
        await store.create(record(f"c{i}"))
    with raw.pipeline(transaction=False) as pipe:  # enough keys for several SCAN pages
        for i in range(2500):
            pipe.hset(session_key(f"bulk{i}"), "revision", 1)
        pipe.set("unrelated", 1)
        pipe.hset("carryover:{x}:other", "a", 1)
        pipe.execute()
    before = store.round_trips
    assert await store.count() == 2505
    assert store.round_trips - before >= 3
    await store.delete("c0")
    assert await store.count() == 2504


async def test_scripts_are_reloaded_after_script_flush(store: SessionStore, raw: redis.Redis) -> None:
    rec = record("noscript")
    raw.script_flush()
    assert await store.create(rec)
    raw.script_flush()
    before = store.round_trips
    [got] = await store.load(["noscript"], with_reply=True)
    assert isinstance(got, SessionRecord)
    assert isinstance(got, SessionRecord)
    assert store.round_trips == before + 3  # refused, SCRIPT LOAD, re-sent
    raw.script_flush()
    assert await store.save([(advanced(got), 1)]) == [WriteOutcome.OK]
    before = store.round_trips
    [got] = await store.load(["noscript"], with_reply=True)
    assert isinstance(got, SessionRecord)
    assert store.round_trips == before + 1 and got is not None and got.revision == 2
    # A batch (a pipeline, not the one-call path) re-sends only what was refused, the same way.
    raw.script_flush()
    before = store.round_trips
    both = await store.load(["noscript", "absent"])
    assert isinstance(both[0], SessionRecord) and both[1] is None
    assert store.round_trips == before + 3


async def test_bad_url_and_bad_ttl(store: SessionStore) -> None:
    with pytest.raises(ValueError, match="redis://"):
        await SessionStore.connect("http://localhost:6379")
    with pytest.raises(ValueError, match="ttl_s"):
        await store.create(record("x", ttl_s=0))


async def test_a_corrupt_record_is_returned_in_its_place(store: SessionStore, raw: redis.Redis) -> None:
    """Garbage under one key fails that key only: the batch loads in one round trip, the others whole."""
    for sid in ("ok1", "text", "nofield", "gap", "ok2"):
        assert await store.create(record(sid))
    raw.delete(session_key("text"))
    raw.set(session_key("text"), b"\x00\xff garbage")  # another Redis type: no WRONGTYPE for the batch
    raw.hdel(session_key("nofield"), "meta")
    raw.hdel(session_key("gap"), "s0")  # s1 left
    before = store.round_trips
    got = await store.load(["ok1", "text", "nofield", "gap", "ok2", "absent"], with_reply=True)
    assert store.round_trips == before + 1
    assert isinstance(got[0], SessionRecord) and isinstance(got[4], SessionRecord) and got[5] is None
    assert all(isinstance(r, SessionCorrupt) and r.code == "session_corrupt" for r in got[1:4])
    assert "holds a Redis string" in str(got[1])

    assert not await store.create(record("text"))  # taken, whatever it holds
    ok1 = got[0]
    assert isinstance(ok1, SessionRecord)
    writes = [(advanced(ok1), ok1.revision), (advanced(record("text")), 1), (advanced(record("gone")), 1)]
    assert await store.save(writes) == [WriteOutcome.OK, WriteOutcome.CONFLICT, WriteOutcome.MISSING]
    assert raw.get(session_key("text")) == b"\x00\xff garbage"  # a conflict writes nothing
    for sid in ("text", "nofield", "gap"):
        assert await store.delete(sid)
    assert await store.load(["text", "nofield", "gap"]) == [None] * 3


# -- outages ------------------------------------------------------------------------------------


async def test_crash_outage_and_recovery_on_the_same_store(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "crash", appendonly=True)
    server.start()
    try:
        s = await SessionStore.connect(server.url, socket_timeout_s=1.0)
        ids = [f"k{i}" for i in range(20)]
        for sid in ids:
            await s.create(record(sid))
        acked = dict.fromkeys(ids, 1)
        writing = True

        async def writer() -> None:
            while writing:
                current = [r for r in present(await s.load(ids))]
                outcomes = await s.save([(advanced(r), r.revision) for r in current])
                for r, o in zip(current, outcomes, strict=True):
                    assert o is WriteOutcome.OK
                    acked[r.session_id] = r.revision + 1

        task = asyncio.create_task(writer())
        while min(acked.values()) < 4:
            await asyncio.sleep(0.005)
        server.stop(kill=True)  # SIGKILL, most likely with a pipeline in flight
        with pytest.raises(StoreUnavailable):
            await task
        writing = False

        for call in (
            s.ping(),
            s.load(ids),
            s.save([(advanced(record("k0")), 1)]),
            s.create(record("new")),
            s.delete("k0"),
            s.count(),
        ):
            with pytest.raises(StoreUnavailable) as info:
                await call
            assert (info.value.retry_after or 0) > 0

        server.start()  # same port, a fresh process: no scripts loaded
        loaded = await s.load(ids, with_reply=True)  # the same store object, NOSCRIPT handled
        for sid, rec in zip(ids, loaded, strict=True):
            assert isinstance(rec, SessionRecord)
            assert_whole(rec)  # never a half-written record
            assert rec.revision >= acked[sid]  # appendfsync always: acknowledged writes survived
        current = [r for r in present(loaded)]
        assert await s.save([(advanced(r), r.revision) for r in current]) == [WriteOutcome.OK] * 20
        await s.ping()
        await s.close()
    finally:
        server.stop()


async def test_hung_redis_times_out_as_unavailable(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "hung")
    server.start()
    try:
        s = await SessionStore.connect(server.url, socket_timeout_s=0.3)
        await s.create(record("h"))
        server.pause()
        try:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await s.ping()
            with pytest.raises(StoreUnavailable):
                await s.save([(advanced(record("h")), 1)])
            assert time.monotonic() - started < 10
        finally:
            server.resume()
        await s.ping()
        [got] = await s.load(["h"], with_reply=True)
        assert isinstance(got, SessionRecord)
        assert got is not None and got.revision in (1, 2)  # the timed-out write may have landed, whole
        assert_whole(got)
        await s.close()
    finally:
        server.stop()


async def test_connect_to_a_dead_url_is_unavailable(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "never")  # never started: nothing listens on its port
    with pytest.raises(StoreUnavailable):
        await SessionStore.connect(server.url, socket_timeout_s=0.5)


async def test_callers_beyond_the_connection_limit_wait_instead_of_failing(redis_url: str) -> None:
    s = await SessionStore.connect(redis_url, max_connections=3)
    try:
        assert await s.create(record("busy"))
        results = await asyncio.gather(*(s.load(["busy"]) for _ in range(60)))
        assert all(isinstance(r[0], SessionRecord) and r[0].session_id == "busy" for r in results)
    finally:
        await s.close()
