"""The ragged micro-batcher, end to end through a real engine (real Redis, real ONNX Runtime)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model_export.verify import random_inputs
from service.engine.batch import PaddedBatch
from service.engine.device import DeviceThread
from service.engine.model import RecurrentModel
from service.engine.scheduler import Scheduler, StepRequest
from service.errors import CarryoverError, Overloaded, StepConflict, Unavailable
from tests.engines import assert_matches_offline, exported_state, running_engine
from tests.redis_fixture import RedisServer


def concat(chunks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


@pytest.mark.parametrize("name", ["gru_stacked", "lstm_step", "token_gru"])
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
async def test_concurrent_sessions_equal_their_offline_runs(
    redis_url: str, loaded: dict[str, RecurrentModel], name: str, data: st.DataObject
) -> None:
    """Many sessions stepping at once with random chunk sizes; long chunks split by max_chunk."""
    model = loaded[name]
    n_sessions = data.draw(st.integers(2, 12), label="sessions")
    chunkings = [
        data.draw(st.lists(st.integers(1, 9), min_size=1, max_size=5), label="chunks") for _ in range(n_sessions)
    ]
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31), label="seed"))
    async with running_engine(redis_url, {name: model}, max_chunk=4, max_batch_size=5, max_wait_us=500) as engine:
        ids = [(await engine.create()).session_id for _ in range(n_sessions)]
        inputs = [[random_inputs(model.contract, n, rng) for n in sizes] for sizes in chunkings]

        async def drive(sid: str, chunks: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
            return [(await engine.step(sid, c)).outputs for c in chunks]

        outs = await asyncio.gather(*(drive(sid, ch) for sid, ch in zip(ids, inputs, strict=True)))
        for sid, chunks, got in zip(ids, inputs, outs, strict=True):
            state = await exported_state(engine, sid)
            assert int(state["carryover_step"]) == sum(len(next(iter(c.values()))) for c in chunks)
            assert_matches_offline(
                model, concat(chunks), concat(got), {s.input: state[s.input] for s in model.contract.states}
            )


async def test_requests_in_flight_for_one_session_apply_in_arrival_order(
    redis_url: str, loaded: dict[str, RecurrentModel]
) -> None:
    model = loaded["gru_stacked"]
    rng = np.random.default_rng(3)
    chunks = [random_inputs(model.contract, n, rng) for n in (3, 1, 5, 2, 4, 1)]
    async with running_engine(redis_url, {"m": model}) as engine:
        sid = (await engine.create()).session_id
        other = (await engine.create()).session_id
        replies = await asyncio.gather(*(engine.step(sid, c) for c in chunks), *(engine.step(other, c) for c in chunks))
        assert [r.step for r in replies[:6]] == [3, 4, 9, 11, 15, 16]  # each saw the one before it
        state = await exported_state(engine, sid)
        assert_matches_offline(model, concat(chunks), concat([r.outputs for r in replies[:6]]), {"h0": state["h0"]})


async def test_a_session_is_in_a_batch_at_most_once(
    redis_url: str, loaded: dict[str, RecurrentModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[list[str]] = []
    original = Scheduler._run_model

    async def spy(self: Scheduler, rows: list[StepRequest]) -> None:  # one group per batch here
        seen.append([r.session_id for r in rows])
        await original(self, rows)

    monkeypatch.setattr(Scheduler, "_run_model", spy)
    model = loaded["gru_stacked"]
    x = {"x": np.ones((2, 4), np.float32)}
    async with running_engine(redis_url, {"m": model}, bucket_overhead_tokens=10**9) as engine:
        a, b = (await engine.create()).session_id, (await engine.create()).session_id
        await asyncio.gather(*(engine.step(s, x) for s in [a, a, b, a, b, a]))
    assert all(len(set(batch)) == len(batch) for batch in seen)
    assert sum(batch.count(a) for batch in seen) == 4 and any(len(batch) == 2 for batch in seen)


async def test_an_idle_server_runs_a_lone_request_at_once(redis_url: str, loaded: dict[str, RecurrentModel]) -> None:
    """max_wait applies only while the device is busy: with a 20 s wait, a lone request
    must still come back long before it."""
    async with running_engine(redis_url, {"m": loaded["gru_stacked"]}, max_wait_us=20_000_000) as engine:
        sid = (await engine.create()).session_id
        started = time.monotonic()
        for _ in range(3):
            await engine.step(sid, {"x": np.ones((1, 4), np.float32)})
        assert time.monotonic() - started < 10


async def test_batches_respect_row_and_token_limits(
    redis_url: str, loaded: dict[str, RecurrentModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes: list[tuple[int, int]] = []
    original = Scheduler._run_model

    async def spy(self: Scheduler, rows: list[StepRequest]) -> None:  # one group per batch here
        sizes.append((len(rows), sum(r.chunk_steps for r in rows)))
        await original(self, rows)

    monkeypatch.setattr(Scheduler, "_run_model", spy)
    async with running_engine(
        redis_url, {"m": loaded["gru_stacked"]}, max_batch_size=3, max_batch_tokens=10, bucket_overhead_tokens=10**9
    ) as engine:
        ids = [(await engine.create()).session_id for _ in range(9)]
        await asyncio.gather(*(engine.step(s, {"x": np.ones((4, 4), np.float32)}) for s in ids))
    assert max(b for b, _ in sizes) <= 3 and max(t for _, t in sizes) <= 10


async def test_long_requests_run_in_chunks_and_stay_exact(redis_url: str, loaded: dict[str, RecurrentModel]) -> None:
    model = loaded["lstm"]
    x = random_inputs(model.contract, 37, np.random.default_rng(1))
    async with running_engine(redis_url, {"m": model}, max_chunk=5) as engine:
        sid = (await engine.create()).session_id
        calls = engine.schedulers["m"].model_calls
        reply = await engine.step(sid, x)
        assert engine.schedulers["m"].model_calls - calls == 8  # ceil(37 / 5)
        assert reply.step == 37
        state = await exported_state(engine, sid)
        assert_matches_offline(model, x, reply.outputs, {"h0": state["h0"], "c0": state["c0"]})


async def test_backpressure_when_the_queue_is_full(redis_url: str, loaded: dict[str, RecurrentModel]) -> None:
    async with running_engine(redis_url, {"m": loaded["gru_stacked"]}, max_queue=3) as engine:
        ids = [(await engine.create()).session_id for _ in range(8)]
        results = await asyncio.gather(
            *(engine.step(s, {"x": np.ones((2, 4), np.float32)}) for s in ids), return_exceptions=True
        )
        rejected = [(s, r) for s, r in zip(ids, results, strict=True) if isinstance(r, Overloaded)]
        assert rejected and len(rejected) < len(ids)
        assert all(r.status == 503 and r.retry_after for _, r in rejected)
        for sid, _ in rejected:  # untouched
            assert (await engine.get(sid)).step == 0


async def test_a_cancelled_long_request_leaves_the_session_untouched(
    redis_url: str, loaded: dict[str, RecurrentModel]
) -> None:
    model = loaded["gru_stacked"]
    async with running_engine(redis_url, {"m": model}, max_chunk=2) as engine:
        sid = (await engine.create()).session_id
        before = await exported_state(engine, sid)
        task = asyncio.create_task(engine.step(sid, {"x": np.ones((4000, 4), np.float32)}))
        scheduler = engine.schedulers["m"]
        while scheduler.model_calls < 3:  # it is mid-request: some chunks ran, nothing written
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        after = await exported_state(engine, sid)
        assert int(after["carryover_step"]) == 0 and after["h0"].tobytes() == before["h0"].tobytes()
        x = {"x": np.ones((3, 4), np.float32)}
        reply = await engine.step(sid, x)  # and the session keeps working
        assert reply.step == 3
        assert_matches_offline(model, x, reply.outputs, {"h0": (await exported_state(engine, sid))["h0"]})


async def test_idempotent_replay_and_conflict(redis_url: str, loaded: dict[str, RecurrentModel]) -> None:
    model = loaded["gru_stacked"]
    rng = np.random.default_rng(9)
    x1, x2 = random_inputs(model.contract, 3, rng), random_inputs(model.contract, 2, rng)
    async with running_engine(redis_url, {"m": model}) as engine:
        sid = (await engine.create()).session_id
        first = await engine.step(sid, x1, expected_step=0)
        again = await engine.step(sid, x1, expected_step=0)  # a retry after a lost reply
        assert (first.replay, again.replay, again.step) == (False, True, 3)
        np.testing.assert_array_equal(first.outputs["y"], again.outputs["y"])
        with pytest.raises(StepConflict) as info:
            await engine.step(sid, x2, expected_step=0)  # same step, other inputs
        assert info.value.extra["current_step"] == 3 and info.value.status == 409
        with pytest.raises(StepConflict):
            await engine.step(sid, x2, expected_step=7)
        second = await engine.step(sid, x2, expected_step=3)
        assert second.step == 5 and not second.replay
        with pytest.raises(StepConflict):  # only the LAST request can be replayed
            await engine.step(sid, x1, expected_step=0)
        state = await exported_state(engine, sid)
        assert_matches_offline(model, concat([x1, x2]), concat([first.outputs, second.outputs]), {"h0": state["h0"]})


async def test_two_engines_on_one_redis_never_both_apply(redis_url: str, loaded: dict[str, RecurrentModel]) -> None:
    model = loaded["gru_stacked"]
    rng = np.random.default_rng(5)
    async with running_engine(redis_url, {"m": model}) as a, running_engine(redis_url, {"m": model}) as b:
        for _ in range(10):
            sid = (await a.create()).session_id
            xa, xb = random_inputs(model.contract, 2, rng), random_inputs(model.contract, 3, rng)
            results = await asyncio.gather(
                a.step(sid, xa, expected_step=0), b.step(sid, xb, expected_step=0), return_exceptions=True
            )
            applied = [r for r in results if not isinstance(r, BaseException)]
            assert len(applied) == 1 and isinstance(next(r for r in results if r not in applied), StepConflict)
            winner = xa if applied[0] is results[0] else xb
            state = await exported_state(b, sid)
            assert int(state["carryover_step"]) == len(winner["x"])
            assert_matches_offline(model, winner, applied[0].outputs, {"h0": state["h0"]})
        # Without `step`, both apply: the CAS loser runs again on the winner's state.
        sid = (await a.create()).session_id
        xa, xb = random_inputs(model.contract, 2, rng), random_inputs(model.contract, 3, rng)
        ra, rb = await asyncio.gather(a.step(sid, xa), b.step(sid, xb))
        state = await exported_state(a, sid)
        assert int(state["carryover_step"]) == 5
        order = [xa, xb] if ra.step == 2 else [xb, xa]
        assert_matches_offline(
            model,
            concat(order),
            concat([ra.outputs, rb.outputs] if ra.step == 2 else [rb.outputs, ra.outputs]),
            {"h0": state["h0"]},
        )


async def test_redis_killed_mid_run_then_restarted(tmp_path: Path, loaded: dict[str, RecurrentModel]) -> None:
    server = RedisServer(tmp_path / "redis", appendonly=True)
    server.start()
    model = loaded["gru_stacked"]
    rng = np.random.default_rng(11)
    try:
        async with running_engine(server.url, {"m": model}, redis_timeout_s=1.0) as engine:
            sid = (await engine.create()).session_id
            acked = []
            for _ in range(3):
                x = random_inputs(model.contract, 2, rng)
                acked.append((x, await engine.step(sid, x)))
            server.stop(kill=True)
            with pytest.raises(Unavailable) as info:
                await engine.step(sid, random_inputs(model.contract, 2, rng))
            assert info.value.status == 503 and info.value.retry_after
            server.start()
            state = await exported_state(engine, sid)  # every acknowledged step survived, nothing else
            assert int(state["carryover_step"]) == 6
            x = random_inputs(model.contract, 1, rng)
            acked.append((x, await engine.step(sid, x)))  # the same engine recovered
            state = await exported_state(engine, sid)
            assert_matches_offline(
                model, concat([a for a, _ in acked]), concat([r.outputs for _, r in acked]), {"h0": state["h0"]}
            )
    finally:
        server.stop()


async def test_a_failed_model_call_fails_its_batch_only_and_frees_the_device(
    redis_url: str, loaded: dict[str, RecurrentModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model call that raises in the device thread fails that batch's requests (an internal
    error, nothing written) and leaves the device free for the next, which stays exact."""
    original = DeviceThread.run
    failures = [RuntimeError("the runtime failed")]

    def flaky(self: DeviceThread, batch: PaddedBatch, tiny: bool):  # type: ignore[no-untyped-def]
        if failures:
            raise failures.pop()
        return original(self, batch, tiny)

    monkeypatch.setattr(DeviceThread, "run", flaky)
    model = loaded["gru_stacked"]
    x = random_inputs(model.contract, 6, np.random.default_rng(9))
    async with running_engine(redis_url, {"m": model}, inline_max_cells=0) as engine:
        sid = (await engine.create()).session_id
        with pytest.raises(CarryoverError, match="internal error while running the batch: RuntimeError"):
            await engine.step(sid, x)
        assert engine.schedulers["m"].device.busy == 0
        reply = await engine.step(sid, x, expected_step=0)  # the failed request applied nothing
        state = await exported_state(engine, sid)
    assert reply.step == 6
    assert_matches_offline(model, x, reply.outputs, {"h0": state["h0"]})


async def test_a_batch_admitted_while_another_runs_waits_in_the_device_queue(
    redis_url: str, loaded: dict[str, RecurrentModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The next batch is queued in the device thread while one runs (the thread starts it the
    moment the first ends), not handed over by the loop afterwards; both stay exact."""
    seen_on_device: list[int] = []
    original = DeviceThread.run

    def spy(self: DeviceThread, batch: PaddedBatch, tiny: bool):  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + 10
        while not seen_on_device and self.busy < 2 and time.monotonic() < deadline:
            time.sleep(0.005)  # the first call holds the device until a second is queued behind it
        seen_on_device.append(self.busy)
        return original(self, batch, tiny)

    monkeypatch.setattr(DeviceThread, "run", spy)
    model = loaded["gru_stacked"]
    rng = np.random.default_rng(8)
    chunks = [random_inputs(model.contract, n, rng) for n in (3, 5)]
    async with running_engine(redis_url, {"m": model}, max_batch_size=1, inline_max_cells=0) as engine:
        ids = [(await engine.create()).session_id for _ in chunks]
        replies = await asyncio.gather(*(engine.step(s, c) for s, c in zip(ids, chunks, strict=True)))
        states = [await exported_state(engine, s) for s in ids]
    assert len(seen_on_device) == 2 and seen_on_device[0] == 2  # queued while the first ran
    for chunk, reply, state in zip(chunks, replies, states, strict=True):
        assert_matches_offline(model, chunk, reply.outputs, {"h0": state["h0"]})


@pytest.mark.parametrize("inline_max_cells", [0, 4])
async def test_tiny_calls_with_nothing_queued_run_on_the_event_loop(
    redis_url: str, loaded: dict[str, RecurrentModel], monkeypatch: pytest.MonkeyPatch, inline_max_cells: int
) -> None:
    """``inline_max_cells``: a call of at most that many rows × timesteps skips the device
    thread when nothing else is queued; bigger calls, and every call at 0, use it. Same results."""
    on_device: list[bool] = []
    original = DeviceThread.run

    def spy(self: DeviceThread, batch: PaddedBatch, tiny: bool):  # type: ignore[no-untyped-def]
        on_device.append(threading.current_thread().name.startswith("device-"))
        assert tiny is not on_device[-1]  # inline calls run on the model's one-thread session
        return original(self, batch, tiny)

    monkeypatch.setattr(DeviceThread, "run", spy)
    model = loaded["gru_stacked"]
    rng = np.random.default_rng(5)
    chunks = [random_inputs(model.contract, n, rng) for n in (1, 4, 5, 2)]
    async with running_engine(redis_url, {"m": model}, inline_max_cells=inline_max_cells) as engine:
        sid = (await engine.create()).session_id
        replies = [await engine.step(sid, c) for c in chunks]
        state = await exported_state(engine, sid)
    assert on_device == ([False, False, True, False] if inline_max_cells else [True] * 4)
    assert_matches_offline(model, concat(chunks), concat([r.outputs for r in replies]), {"h0": state["h0"]})
