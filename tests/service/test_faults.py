"""Faults end to end: Redis killed mid-load, Redis full, the service SIGKILLed mid-stream, and a
corrupt record beside healthy sessions in the same batches. Every acknowledged step survives;
nothing answers 500 but the corrupt session's own ``session_corrupt``."""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis as redis_py

from bench.chaos import SessionRun, Stats, check_against_reference, kill, step_exactly_once, stored_state
from bench.servers import ROOT, carryover
from model_export.verify import random_inputs
from service.engine.model import RecurrentModel
from service.errors import SessionCorrupt
from service.store.record import session_key
from tests.engines import assert_matches_offline, exported_state, running_engine
from tests.live_server import live_server
from tests.redis_fixture import RedisServer
from tests.service.api.test_http import assert_problem, create, step

GRU = ROOT / "tests" / "data" / "models" / "gru_stacked.onnx"


def chunks(model: RecurrentModel, rng: np.random.Generator, n: int) -> list[dict[str, np.ndarray]]:
    return [random_inputs(model.contract, int(rng.integers(1, 6)), rng) for _ in range(n)]


async def drive(http: httpx.AsyncClient, urls: list[str], run: SessionRun, stats: Stats, stop: asyncio.Event) -> None:
    """Send the session's chunks in order, exactly once, until ``stop`` (or they run out)."""
    step = 0
    while not stop.is_set() and len(run.outputs) < len(run.chunks):
        chunk = run.chunks[len(run.outputs)]
        run.outputs.append(await step_exactly_once(http, urls, run.session_id, chunk, step, stats, give_up_s=60))
        step += next(iter(chunk.values())).shape[0]
        await asyncio.sleep(0.01)


async def test_redis_killed_mid_load(tmp_path: Path, loaded: dict[str, RecurrentModel]) -> None:
    """503 + Retry-After (never 500), bounded waits, /readyz fails then recovers by itself, and
    every acknowledged step is still there after the restart (AOF always)."""
    model = loaded["gru_stacked"]
    redis = RedisServer(tmp_path / "redis", appendonly=True)
    redis.start()
    rng = np.random.default_rng(21)
    try:
        with live_server(redis.url, {"gru": model}, redis_timeout_s=0.5) as server:
            async with httpx.AsyncClient(timeout=30) as http:
                urls = [server.url]
                runs = [SessionRun(await new_session(http, server.url), chunks(model, rng, 400)) for _ in range(6)]
                stats, stop = Stats(), asyncio.Event()
                load = [asyncio.create_task(drive(http, urls, r, stats, stop)) for r in runs]
                await asyncio.sleep(0.5)
                acked_before = sum(len(r.outputs) for r in runs)
                redis.stop(kill=True)
                await asyncio.sleep(1.0)
                started = time.monotonic()
                r = await http.get(f"{server.url}/readyz")
                assert time.monotonic() - started < 5  # bounded, not a hang
                assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
                redis.start()
                deadline = time.monotonic() + 30
                while (await http.get(f"{server.url}/readyz")).status_code != 200:  # recovers by itself
                    assert time.monotonic() < deadline, "never ready again"
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.5)
                stop.set()
                await asyncio.gather(*load)
                assert sum(len(r.outputs) for r in runs) > acked_before
                assert stats.statuses[503] >= 1 and stats.summary()["server_errors"] == 0, stats.summary()
                assert set(stats.statuses) <= {200, 503}, stats.statuses
                assert stats.longest_wait_s < 10, stats.summary()
                for run in runs:
                    check_against_reference(model, run, await stored_state(http, server.url, run.session_id))
    finally:
        redis.stop()


async def new_session(http: httpx.AsyncClient, url: str) -> str:
    r = await http.post(f"{url}/v1/sessions", json={})
    assert r.status_code == 201, r.text
    return str(r.json()["session_id"])


async def test_redis_full_is_a_clear_507_and_stored_sessions_are_unharmed(
    tmp_path: Path, loaded: dict[str, RecurrentModel]
) -> None:
    model = loaded["gru_stacked"]
    redis = RedisServer(tmp_path / "redis", extra_args=["--maxmemory-policy", "noeviction"])
    redis.start()
    x = random_inputs(model.contract, 3, np.random.default_rng(2))
    try:
        with live_server(redis.url, {"gru": model}) as server:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
                kept = await create(c)
                assert (await step(c, kept, x, expected=0)).status_code == 200
                before = (await c.get(f"/v1/sessions/{kept}/state")).content
                with redis.client() as raw:
                    used = int(raw.info("memory")["used_memory"])
                    raw.config_set("maxmemory", str(used))  # full from here on
                    r = await c.post("/v1/sessions", json={})
                    for _ in range(200):  # the first writes may still fit
                        if r.status_code != 201:
                            break
                        r = await c.post("/v1/sessions", json={"session_id": f"filler-{time.monotonic_ns()}"})
                    body = assert_problem(r, 507, "store_full", "maxmemory", "noeviction")
                    assert int(r.headers["retry-after"]) >= 1 and body["retry_after"]
                    r = await step(c, kept, x, expected=3)
                    assert r.status_code in (200, 507), r.text  # a write refused whole, or one that fit
                    applied = r.status_code == 200
                    meta = await c.get(f"/v1/sessions/{kept}")
                    assert meta.status_code == 200 and meta.json()["step"] == (6 if applied else 3)
                    if not applied:
                        assert_same_npz(before, (await c.get(f"/v1/sessions/{kept}/state")).content)
                    raw.config_set("maxmemory", "0")
                r = await step(c, kept, x, expected=6 if applied else 3)
                assert r.status_code == 200, r.text
    finally:
        redis.stop()


def assert_same_npz(a: bytes, b: bytes) -> None:
    left, right = np.load(io.BytesIO(a)), np.load(io.BytesIO(b))
    assert left.files == right.files
    for k in left.files:
        assert left[k].tobytes() == right[k].tobytes(), k


async def test_service_sigkill_mid_stream_loses_nothing_acknowledged(
    tmp_path: Path, redis_server: RedisServer, loaded: dict[str, RecurrentModel]
) -> None:
    """Acknowledged only after the CAS write: a replica killed mid-stream loses no 200, and the
    chunk it was running is answered by the next one (applied or replayed, never twice)."""
    model = loaded["gru_stacked"]
    with redis_server.client() as c:
        c.select(8)
        c.flushdb()
    url = redis_server.url.rsplit("/", 1)[0] + "/8"
    flags = ("--model", f"gru={GRU}", "--redis-timeout", "1.0")
    first, second = carryover(url, *flags), carryover(url, *flags)
    first.start()
    second.start()
    try:
        first.wait_ready()
        second.wait_ready()
        rng = np.random.default_rng(5)
        async with httpx.AsyncClient(timeout=10) as http:
            urls = [first.url, second.url]
            runs = [SessionRun(await new_session(http, first.url), chunks(model, rng, 300)) for _ in range(4)]
            stats, stop = Stats(), asyncio.Event()
            load = [asyncio.create_task(drive(http, urls, r, stats, stop)) for r in runs]
            await asyncio.sleep(1.0)
            kill(first)  # SIGKILL: no drain, no goodbye
            acked = sum(len(r.outputs) for r in runs)
            await asyncio.sleep(1.5)
            stop.set()
            await asyncio.gather(*load)
            assert sum(len(r.outputs) for r in runs) > acked  # the survivor carried on
            assert stats.summary()["server_errors"] == 0, stats.summary()
            for run in runs:
                check_against_reference(model, run, await stored_state(http, second.url, run.session_id))
    finally:
        first.stop()
        second.stop()


async def test_a_corrupt_record_fails_only_its_session(redis_url: str, loaded: dict[str, RecurrentModel]) -> None:
    """Garbage written by hand into one session's key: its steps get ``session_corrupt``; the
    sessions batched with it are answered and equal their offline runs."""
    model = loaded["gru_stacked"]
    rng = np.random.default_rng(8)
    async with running_engine(redis_url, {"m": model}, max_wait_us=20_000) as engine:
        ids = [(await engine.create()).session_id for _ in range(5)]
        with redis_py.Redis.from_url(redis_url) as raw:
            raw.hset(session_key(ids[2]), "s0", b"\x00garbage")  # a state blob of the wrong size
            raw.set(session_key(ids[4]) + "x", b"unrelated")
            raw.delete(session_key(ids[4]))
            raw.set(session_key(ids[4]), b"\xff not a hash")
        inputs = {sid: random_inputs(model.contract, 4, rng) for sid in ids}
        outputs: dict[str, list[dict[str, np.ndarray]]] = {sid: [] for sid in ids}
        for _ in range(2):  # twice: the corrupt ones stay corrupt, the others advance
            replies = await asyncio.gather(*(engine.step(sid, inputs[sid]) for sid in ids), return_exceptions=True)
            for sid, reply in zip(ids, replies, strict=True):
                if sid in (ids[2], ids[4]):
                    assert isinstance(reply, SessionCorrupt) and reply.status == 500, reply
                else:
                    assert not isinstance(reply, BaseException), reply
                    outputs[sid].append(reply.outputs)
        for sid in (ids[0], ids[1], ids[3]):
            state = await exported_state(engine, sid)
            assert int(state["carryover_step"]) == 8
            both = {k: np.concatenate([v, v]) for k, v in inputs[sid].items()}
            got = {k: np.concatenate([o[k] for o in outputs[sid]]) for k in outputs[sid][0]}
            assert_matches_offline(model, both, got, state)
        await engine.delete(ids[2])  # a corrupt session can always be removed


@pytest.fixture(autouse=True)
def _quiet_faults(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("CRITICAL", logger="service")
