"""SessionStore against a real three-primary Redis Cluster (docs/contract.md §2: "Redis Cluster URLs work")."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace

import numpy as np
import pytest
import redis

from model_export.verify import random_inputs
from service.engine.model import RecurrentModel
from service.errors import StoreUnavailable
from service.store.scripts import SCRIPTS
from service.store.store import ALL_SCRIPTS, SessionRecord, SessionStore, WriteOutcome, session_key
from tests.engines import assert_matches_offline, exported_state, running_engine
from tests.redis_cluster_fixture import RedisClusterServers, running_cluster
from tests.redis_fixture import RedisServer
from tests.service.store.test_store import advanced, assert_whole, consistent_states, present, record

pytestmark = pytest.mark.asyncio(loop_scope="session")

IDS = [f"sess-{i}" for i in range(60)]  # 60 ids: every primary holds some of them (asserted)


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    """Three primaries, shared by this module's tests."""
    with running_cluster(tmp_path_factory.mktemp("redis-cluster")) as cluster:
        yield cluster


@pytest.fixture
def cluster_url(redis_cluster: RedisClusterServers) -> str:
    """The first node's URL, every node emptied (FLUSHALL) before the test."""
    redis_cluster.flushall()
    return redis_cluster.url


@pytest.fixture
async def store(cluster_url: str) -> AsyncIterator[SessionStore]:
    s = await SessionStore.connect(cluster_url)
    yield s
    await s.close()


@pytest.fixture(scope="module")
def disturbed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    """A private cluster for the tests that move slots and crash nodes (AOF with fsync always)."""
    with running_cluster(tmp_path_factory.mktemp("redis-cluster-disturbed"), appendonly=True) as cluster:
        yield cluster


def ports_of(cluster: RedisClusterServers, ids: list[str]) -> dict[str, int]:
    """Session id -> port of the primary that physically holds its key (checked with EXISTS there)."""
    owners = cluster.slot_owners()
    out = {}
    for sid in ids:
        port = owners[cluster.keyslot(session_key(sid))]
        with next(n for n in cluster.nodes if n.port == port).client() as c:
            assert c.exists(session_key(sid)) == 1
        out[sid] = port
    return out


# -- detection ----------------------------------------------------------------------------------


async def test_any_node_url_is_recognised_as_a_cluster(
    redis_cluster: RedisClusterServers,
    redis_url: str,
) -> None:
    for node in redis_cluster.nodes:
        s = await SessionStore.connect(node.url)
        try:
            assert s.cluster
            await s.ping()
        finally:
            await s.close()
    single = await SessionStore.connect(redis_url)
    try:
        assert not single.cluster
    finally:
        await single.close()
    with pytest.raises(ValueError, match="cluster"):  # a cluster has only database 0
        await SessionStore.connect(f"redis://127.0.0.1:{redis_cluster.nodes[0].port}/1")


async def test_detection_without_info(
    redis_cluster: RedisClusterServers,
    redis_server: RedisServer,
) -> None:
    """A user that may not run INFO: CLUSTER INFO decides (a single Redis refuses it)."""
    servers = [*redis_cluster.nodes, redis_server]
    for server in servers:  # ACL users are per node, even in a cluster
        with server.client() as c:
            c.execute_command("ACL SETUSER", "noinfo", "on", "nopass", "~*", "+@all", "-info")
    try:
        for server, is_cluster in ((redis_cluster.nodes[1], True), (redis_server, False)):
            url = f"redis://noinfo@127.0.0.1:{server.port}/0"
            with redis.Redis.from_url(url) as c, pytest.raises(redis.exceptions.NoPermissionError):
                c.info("cluster")
            s = await SessionStore.connect(url)
            try:
                assert s.cluster is is_cluster
                assert await s.create(record("acl")) and await s.load(["acl"]) != [None]
                assert await s.delete("acl")
            finally:
                await s.close()
    finally:
        for server in servers:
            with server.client() as c:
                c.execute_command("ACL DELUSER", "noinfo")


# -- records, batches ---------------------------------------------------------------------------


async def test_batches_spread_over_every_node_are_one_round_trip_each(
    store: SessionStore,
    redis_cluster: RedisClusterServers,
) -> None:
    recs = [replace(record(sid), last_digest="d") for sid in IDS]  # created: no replay copy
    for r in recs:
        assert await store.create(r)
    ports = ports_of(redis_cluster, IDS)
    assert set(ports.values()) == {n.port for n in redis_cluster.nodes}  # the batch spans all three

    before = store.round_trips
    loaded = await store.load([*IDS, "absent"], with_reply=True)
    assert store.round_trips == before + 1
    assert loaded[-1] is None
    for r, got in zip(recs, loaded, strict=False):
        assert isinstance(got, SessionRecord) and got.expires_in is not None and 599 < got.expires_in <= 600
        assert replace(got, expires_in=None) == r
    lean = await store.load(IDS)
    assert all(isinstance(r, SessionRecord) and r.last_reply == b"" and r.last_digest == "d" for r in lean)

    writes = [(advanced(r), r.revision) for r in recs]
    before = store.round_trips
    assert await store.save(writes) == [WriteOutcome.OK] * len(IDS)
    assert store.round_trips == before + 1
    for (w, _), got in zip(writes, await store.load(IDS, with_reply=True), strict=True):
        assert isinstance(got, SessionRecord) and replace(got, expires_in=None) == w
        assert_whole(got)


async def test_cas_conflict_and_missing(store: SessionStore) -> None:
    rec = record("cas")
    assert await store.create(rec)
    assert not await store.create(replace(rec, model="other"))
    first = advanced(rec)
    assert await store.save([(first, 1)]) == [WriteOutcome.OK]
    stale = replace(advanced(rec), step=99, states=(b"stale",))
    assert await store.save([(stale, 1)]) == [WriteOutcome.CONFLICT]
    [got] = await store.load(["cas"], with_reply=True)
    assert isinstance(got, SessionRecord)
    assert isinstance(got, SessionRecord) and replace(got, expires_in=None) == first

    assert await store.delete("cas") and not await store.delete("cas")
    assert await store.save([(advanced(first), 2)]) == [WriteOutcome.MISSING]
    assert await store.load(["cas"]) == [None]
    assert await store.create(rec)


async def test_two_stores_on_different_nodes_racing(
    redis_cluster: RedisClusterServers,
    cluster_url: str,
) -> None:
    a = await SessionStore.connect(redis_cluster.nodes[0].url)
    b = await SessionStore.connect(redis_cluster.nodes[2].url)
    try:
        ids = IDS[:12]
        for sid in ids:
            assert await a.create(record(sid))
        assert len(set(ports_of(redis_cluster, ids).values())) == 3
        for _ in range(40):
            current = await a.load(ids)
            mine = [(advanced(r, 1), r.revision) for r in present(current)]
            theirs = [
                (replace(advanced(r, 2), last_digest="b"), r.revision) for r in current if isinstance(r, SessionRecord)
            ]
            oa, ob = await asyncio.gather(a.save(mine), b.save(theirs))
            for x, y in zip(oa, ob, strict=True):  # exactly one winner per session per round
                assert sorted((x.value, y.value)) == ["conflict", "ok"]
        assert [r.revision if isinstance(r, SessionRecord) else 0 for r in await b.load(ids)] == [41] * len(ids)
    finally:
        await a.close()
        await b.close()


async def test_count_scans_every_primary(store: SessionStore, redis_cluster: RedisClusterServers) -> None:
    assert await store.count() == 0
    for i in range(5):
        await store.create(record(f"c{i}"))
    host, port = "127.0.0.1", redis_cluster.nodes[0].port
    with redis.RedisCluster(host=host, port=port) as rc, rc.pipeline() as pipe:  # several SCAN pages per node
        for i in range(4500):
            pipe.hset(session_key(f"bulk{i}"), "revision", 1)
        pipe.set("unrelated", 1)
        pipe.hset("carryover:{x}:other", "a", 1)
        pipe.execute()
    for node in redis_cluster.nodes:
        with node.client() as c:
            assert c.dbsize() > 1000
    before = store.round_trips
    assert await store.count() == 4505
    assert store.round_trips - before >= 6  # at least two pages on each of the three primaries
    await store.delete("c0")
    assert await store.count() == 4504


async def test_scripts_are_reloaded_on_every_primary(store: SessionStore, redis_cluster: RedisClusterServers) -> None:
    def script_cached() -> list[list[bool]]:
        out = []
        for node in redis_cluster.nodes:
            with node.client() as c:
                out.append(c.script_exists(*(s.sha for s in SCRIPTS.values())))
        return out

    ids = IDS[:30]
    assert script_cached() == [[True] * 3] * 3  # loaded on every primary at connect
    for node in redis_cluster.nodes:
        with node.client() as c:
            c.script_flush()
    for sid in ids:
        assert await store.create(record(sid))  # NOSCRIPT on every node, then reloaded everywhere
    assert script_cached() == [[True] * 3] * 3

    for node in redis_cluster.nodes:
        with node.client() as c:
            c.script_flush()
    before = store.round_trips
    loaded = await store.load(ids)
    reload_trips = 2 + len(ALL_SCRIPTS)  # refused, SCRIPT LOAD of each script (on all primaries), re-sent
    assert store.round_trips == before + reload_trips
    assert all(isinstance(r, SessionRecord) and r.revision == 1 for r in loaded)

    with redis_cluster.nodes[1].client() as c:  # only one node forgot them (e.g. it restarted)
        c.script_flush()
    writes = [(advanced(r), r.revision) for r in present(loaded)]
    before = store.round_trips
    assert await store.save(writes) == [WriteOutcome.OK] * len(ids)
    assert store.round_trips == before + reload_trips
    before = store.round_trips
    assert [r.revision if isinstance(r, SessionRecord) else 0 for r in await store.load(ids)] == [2] * len(ids)
    assert store.round_trips == before + 1


async def test_callers_beyond_the_connection_limit_wait_instead_of_failing(cluster_url: str) -> None:
    """redis-py's cluster pools raise when a node's connections are all busy; the store queues instead."""
    s = await SessionStore.connect(cluster_url, max_connections=2)
    try:
        for sid in IDS[:9]:
            assert await s.create(record(sid))
        loads = asyncio.gather(*(s.load(IDS[:9]) for _ in range(60)))
        counts = asyncio.gather(*(s.count() for _ in range(5)))
        got_loads, got_counts = await asyncio.gather(loads, counts)
        assert all(x is not None for r in got_loads for x in r) and got_counts == [9] * 5
    finally:
        await s.close()


# -- resharding and outages (a private cluster) -------------------------------------------------


async def test_a_slot_moved_to_another_node_is_followed(disturbed: RedisClusterServers) -> None:
    disturbed.flushall()
    s = await SessionStore.connect(disturbed.url, socket_timeout_s=1.0)
    try:
        recs = [record(sid) for sid in IDS[:20]]
        for r in recs:
            assert await s.create(r)
        sid = IDS[0]
        key, slot = session_key(sid), disturbed.keyslot(session_key(sid))
        source = disturbed.node_of(key)
        target = next(n for n in disturbed.nodes if n is not source)
        node_id = {n.port: disturbed.raw_reply(n, "CLUSTER", "MYID").strip() for n in disturbed.nodes}
        with target.client() as t, source.client() as src:  # the steps of a resharding, by hand
            t.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", node_id[source.port])
            src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", node_id[target.port])
            src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", key)
            for n in (target, source, *(n for n in disturbed.nodes if n not in (source, target))):
                with n.client() as c:
                    c.execute_command("CLUSTER SETSLOT", slot, "NODE", node_id[target.port])
        assert disturbed.node_of(key) is target
        loaded = await s.load(IDS[:20])  # MOVED for one key: redis-py follows it and learns the new owner
        assert [r.revision if isinstance(r, SessionRecord) else 0 for r in loaded] == [1] * 20
        assert await s.save([(advanced(r), r.revision) for r in present(loaded)]) == [WriteOutcome.OK] * 20
        with target.client() as c:
            assert c.hget(key, "revision") == b"2"
    finally:
        await s.close()


async def test_cluster_down_and_a_crashed_node_are_unavailable_then_recover(disturbed: RedisClusterServers) -> None:
    disturbed.flushall()
    s = await SessionStore.connect(disturbed.nodes[0].url, socket_timeout_s=0.5)
    try:
        ids = IDS[:30]
        for sid in ids:
            assert await s.create(record(sid))
        loaded = [r for r in present(await s.load(ids))]
        assert await s.save([(advanced(r), r.revision) for r in loaded]) == [WriteOutcome.OK] * 30
        ports = ports_of(disturbed, ids)
        victim = disturbed.nodes[2]
        on_victim = [sid for sid in ids if ports[sid] == victim.port]
        assert on_victim

        # CLUSTERDOWN: the victim gives up one of its slots, so it no longer serves any key.
        slot = disturbed.keyslot(session_key(on_victim[0]))
        with victim.client() as c:
            c.execute_command("CLUSTER DELSLOTS", slot)
        deadline = time.monotonic() + 30
        while disturbed.cluster_info(victim)["cluster_state"] != "fail":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="ClusterDown"):
            await s.load(ids)
        assert time.monotonic() - started < 15
        with victim.client() as c:
            c.execute_command("CLUSTER ADDSLOTS", slot)
        disturbed.wait_ok()
        assert len(await s.load(ids)) == 30

        # A crash: the victim is killed; its keys are unavailable; it restarts (same port and
        # directory, no scripts in its cache) and the same store works again, nothing lost.
        victim.stop(kill=True)
        started = time.monotonic()
        stale = advanced(next(r for r in loaded if r.session_id == on_victim[0]))  # expects revision 1: never lands
        calls = (lambda: s.load(ids), lambda: s.load(on_victim), lambda: s.save([(stale, 1)]), s.ping, s.count)
        for call in calls:
            with pytest.raises(StoreUnavailable):
                await call()
        assert time.monotonic() - started < 30
        victim.start()
        disturbed.wait_ok()
        current = await s.load(ids, with_reply=True)
        assert [r.revision if isinstance(r, SessionRecord) else 0 for r in current] == [2] * 30
        assert all(isinstance(r, SessionRecord) and r.states == consistent_states(2) for r in current)
        assert await s.save([(advanced(r), r.revision) for r in present(current)]) == [WriteOutcome.OK] * 30
        assert await s.count() == 30
    finally:
        await s.close()


# -- the engine, end to end ---------------------------------------------------------------------


def concat(chunks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


async def test_concurrent_sessions_on_a_cluster_equal_their_offline_runs(
    cluster_url: str,
    loaded: dict[str, RecurrentModel],
) -> None:
    model = loaded["gru_stacked"]
    rng = np.random.default_rng(7)
    chunkings = [[int(n) for n in rng.integers(1, 9, size=rng.integers(1, 5))] for _ in range(8)]
    async with running_engine(cluster_url, {"gru": model}, max_chunk=4, max_batch_size=5, max_wait_us=500) as engine:
        assert engine.store.cluster
        ids = [(await engine.create()).session_id for _ in chunkings]
        inputs = [[random_inputs(model.contract, n, rng) for n in sizes] for sizes in chunkings]

        async def drive(sid: str, chunks: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
            return [(await engine.step(sid, c)).outputs for c in chunks]

        outs = await asyncio.gather(*(drive(sid, ch) for sid, ch in zip(ids, inputs, strict=True)))
        for sid, sizes, chunks, got in zip(ids, chunkings, inputs, outs, strict=True):
            state = await exported_state(engine, sid)
            assert int(state["carryover_step"]) == sum(sizes)
            assert_matches_offline(
                model, concat(chunks), concat(got), {s.input: state[s.input] for s in model.contract.states}
            )
