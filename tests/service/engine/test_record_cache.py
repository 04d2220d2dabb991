"""The write-through record cache: a step of a session this process last wrote skips the load,
and a stale cached record (another writer, a reset, a delete + re-create) is caught by the CAS
on revision and write token, the step re-run from Redis's record (real Redis, real ORT)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from model_export.verify import random_inputs
from service.engine.model import RecurrentModel
from service.engine.record_cache import RecordCache
from service.errors import StepConflict
from service.sessions import SessionService
from service.store.store import SessionRecord
from tests.engines import assert_matches_offline, exported_state, running_engine


def concat(chunks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


async def assert_history(
    engine: SessionService,
    model: RecurrentModel,
    sid: str,
    chunks: list[dict[str, np.ndarray]],
    outputs: list[dict[str, np.ndarray]],
) -> None:
    """The session's state and ``outputs`` equal the offline run of ``chunks`` from the initial state."""
    state = await exported_state(engine, sid)
    assert int(state["carryover_step"]) == sum(len(next(iter(c.values()))) for c in chunks)
    assert_matches_offline(
        model, concat(chunks), concat(outputs), {s.input: state[s.input] for s in model.contract.states}
    )


def record(sid: str, token: str = "t") -> SessionRecord:
    return SessionRecord(sid, "m", "f", 0, 2, (b"x",), "", 0.0, 0.0, 60, last_reply=b"big", token=token)


def test_the_cache_is_a_bounded_lru_of_tokened_records_without_replay_copies() -> None:
    cache = RecordCache(2)
    for sid in ("a", "b"):
        cache.put(record(sid))
    assert cache.get("a") is not None  # a is now the most recently used
    cache.put(record("c"))
    assert (cache.get("b"), len(cache)) == (None, 2)
    assert cache.get("a") is not None and cache.get("a").last_reply == b""  # type: ignore[union-attr]
    cache.put(record("d", token=""))  # no token: nothing the CAS could check
    cache.evict("a")
    assert (cache.get("d"), cache.get("a"), len(cache)) == (None, None, 1)
    off = RecordCache(0)
    off.put(record("a"))
    assert len(off) == 0


@pytest.mark.parametrize("capacity", [10_000, 0])
async def test_a_second_step_skips_the_load_and_equals_the_offline_run(
    redis_url: str, loaded: dict[str, RecurrentModel], capacity: int
) -> None:
    model = loaded["gru_stacked"]
    rng = np.random.default_rng(1)
    chunks = [random_inputs(model.contract, n, rng) for n in (3, 1, 4)]
    async with running_engine(redis_url, {"m": model}, record_cache_sessions=capacity) as engine:
        sid = (await engine.create()).session_id
        outs = [(await engine.step(sid, c)).outputs for c in chunks]
        assert engine.schedulers["m"].loads == (1 if capacity else 3)
        await assert_history(engine, model, sid, chunks, outs)


@pytest.mark.parametrize("writer", ["other_process", "reset", "recreate"])
async def test_a_stale_cached_record_is_caught_by_the_cas_and_the_step_rerun_from_redis(
    redis_url: str, loaded: dict[str, RecurrentModel], writer: str
) -> None:
    """Between two steps of ``engine`` someone else writes the session; ``recreate`` is the ABA
    case: a delete + re-create + one step by another process brings back the cached revision
    number (2) with another write token, so only the token tells the records apart."""
    model = loaded["gru_stacked"]
    rng = np.random.default_rng(2)
    a, b, c = (random_inputs(model.contract, n, rng) for n in (2, 3, 1))
    async with (
        running_engine(redis_url, {"m": model}) as engine,
        running_engine(redis_url, {"m": model}) as other,
    ):
        sid = (await engine.create()).session_id
        out_a = (await engine.step(sid, a)).outputs
        assert engine.schedulers["m"].cache.get(sid) is not None
        if writer == "other_process":
            history, outs = [a, b, c], [out_a, (await other.step(sid, b)).outputs]
        elif writer == "reset":
            await other.reset(sid)
            history, outs = [c], []
        else:
            await other.delete(sid)
            await other.create(session_id=sid)
            history, outs = [b, c], [(await other.step(sid, b)).outputs]
            [cached] = [engine.schedulers["m"].cache.get(sid)]
            [stored] = await engine.store.load([sid])
            assert isinstance(stored, SessionRecord) and cached is not None
            assert (stored.revision, stored.token != cached.token) == (cached.revision, True)
        reply = await engine.step(sid, c)
        assert engine.schedulers["m"].loads == 2  # the first step's, then the reload after the lost CAS
        await assert_history(engine, model, sid, history, [*outs, reply.outputs])


async def test_a_retried_or_conflicting_step_is_answered_from_redis_not_from_the_cache(
    redis_url: str, loaded: dict[str, RecurrentModel]
) -> None:
    """Another process applied step 2 meanwhile: the cache (at step 2) would admit the retry;
    Redis says it is a replay, and a different request at step 2 gets 409 with Redis's step."""
    model = loaded["gru_stacked"]
    rng = np.random.default_rng(3)
    a, b, c = (random_inputs(model.contract, n, rng) for n in (2, 3, 1))
    async with (
        running_engine(redis_url, {"m": model}) as engine,
        running_engine(redis_url, {"m": model}) as other,
    ):
        sid = (await engine.create()).session_id
        await engine.step(sid, a, expected_step=0)
        applied = await other.step(sid, b, expected_step=2)
        again = await engine.step(sid, b, expected_step=2)
        assert (again.replay, again.step) == (True, 5)
        for key in applied.outputs:
            np.testing.assert_array_equal(again.outputs[key], applied.outputs[key])
        with pytest.raises(StepConflict) as info:
            await engine.step(sid, c, expected_step=2)
        assert info.value.extra["current_step"] == 5
        with pytest.raises(StepConflict):  # the cache is not at step 0 either: Redis answers
            await engine.step(sid, c, expected_step=0)
        assert (await engine.step(sid, c, expected_step=5)).step == 6


async def test_a_session_deleted_behind_the_cache_is_not_found(
    redis_url: str, loaded: dict[str, RecurrentModel]
) -> None:
    model = loaded["gru_stacked"]
    a = random_inputs(model.contract, 2, np.random.default_rng(4))
    async with running_engine(redis_url, {"m": model}) as engine, running_engine(redis_url, {"m": model}) as other:
        sid = (await engine.create()).session_id
        await engine.step(sid, a)
        await other.delete(sid)
        started = time.perf_counter()
        with pytest.raises(Exception, match="does not exist") as info:
            await engine.step(sid, a)
        assert info.value.status == 404 and time.perf_counter() - started < 5  # type: ignore[attr-defined]
        assert engine.schedulers["m"].cache.get(sid) is None


async def test_a_session_two_processes_step_in_turn_is_left_uncached_after_one_lost_cas(
    redis_url: str, loaded: dict[str, RecurrentModel]
) -> None:
    """HTTP requests spread over replicas: after the first stale guess each process loads the
    session from Redis (two round trips, as without a cache) instead of losing the CAS on every
    step (a wasted model run and a reload each time)."""
    model = loaded["gru_stacked"]
    rng = np.random.default_rng(5)
    chunks = [random_inputs(model.contract, n, rng) for n in (1, 2, 1, 3, 2, 1, 2, 1)]
    async with (
        running_engine(redis_url, {"m": model}) as engine,
        running_engine(redis_url, {"m": model}) as other,
    ):
        sid = (await engine.create()).session_id
        outs = [(await (engine if i % 2 == 0 else other).step(sid, c)).outputs for i, c in enumerate(chunks)]
        runs = engine.schedulers["m"].model_calls + other.schedulers["m"].model_calls
        assert runs == len(chunks) + 2  # one wasted run per process (its one stale guess), not one per step
        assert engine.schedulers["m"].cache.get(sid) is None and other.schedulers["m"].cache.get(sid) is None
        await assert_history(engine, model, sid, chunks, outs)


def test_a_stale_session_is_cached_again_after_the_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    cache = RecordCache(4)
    cache.evict("a", stale=True)
    cache.put(record("a"))
    assert cache.get("a") is None
    now = time.monotonic()
    monkeypatch.setattr(time, "monotonic", lambda: now + 61)
    cache.put(record("a"))
    assert cache.get("a") is not None
