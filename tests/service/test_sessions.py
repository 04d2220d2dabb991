"""Session operations (create/get/fork/reset/delete/export/import/models) and input validation.
Every rejection must leave the session's step and state byte-identical."""

from __future__ import annotations

import asyncio
import io
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from model_export.verify import random_inputs
from service.engine.model import RecurrentModel
from service.errors import (
    CarryoverError,
    InvalidInput,
    ModelMismatch,
    ModelNotFound,
    RateLimited,
    SessionExists,
    SessionNotFound,
    TooManySessions,
    Unavailable,
)
from service.sessions import (
    SessionService,
    StepCall,
    checked_step,
    is_session_id,
    new_session_id,
    parse_step,
)
from tests.engines import assert_matches_offline, exported_state, running_engine
from tests.redis_fixture import RedisServer


def npz(**arrays: Any) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


@pytest.fixture
async def engine(redis_url: str, loaded: dict[str, RecurrentModel]):  # type: ignore[no-untyped-def]
    async with running_engine(
        redis_url, {"gru": loaded["gru_stacked"], "tokens": loaded["token_gru"]}, max_steps_per_request=50
    ) as service:
        yield service


async def test_models_are_described(engine: SessionService) -> None:
    models = {m["name"]: m for m in engine.describe_models()}
    assert models["gru"]["default"] and models["gru"]["kind"] == "features"
    assert models["gru"]["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["T", 4]}]
    assert models["gru"]["states"][0] == {
        "input": "h0",
        "output": "hn",
        "dtype": "float32",
        "shape": [2, 8],
        "batch_axis": 1,
    }
    assert models["tokens"]["vocab"] == "abcdefghij\ufffd" and models["tokens"]["unk_id"] == 10
    assert re.fullmatch(r"[0-9a-f]{64}", models["gru"]["fingerprint"])


async def test_create_get_and_ids(engine: SessionService) -> None:
    info = await engine.create()
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", info.session_id)  # 128 random bits, URL-safe
    assert (info.model, info.step) == ("gru", 0) and 86000 < info.expires_in <= 86400
    assert (await engine.create(model="tokens")).model == "tokens"
    short = await engine.create(ttl_s=30)
    assert 0 < (await engine.get(short.session_id)).expires_in <= 30
    with pytest.raises(ModelNotFound):
        await engine.create(model="nope")
    with pytest.raises(InvalidInput, match="ttl_s"):
        await engine.create(ttl_s=0)


async def test_client_chosen_ids_are_namespaced_by_owner(engine: SessionService) -> None:
    a = await engine.create(session_id="robot-7", owner="alice")
    b = await engine.create(session_id="robot-7", owner="bob")
    assert a.session_id == b.session_id == "robot-7"
    await engine.step("robot-7", {"x": np.ones((2, 4), np.float32)}, owner="alice")
    assert (await engine.get("robot-7", owner="alice")).step == 2
    assert (await engine.get("robot-7", owner="bob")).step == 0
    with pytest.raises(SessionNotFound):  # another owner's session is simply not there (404, not 403)
        await engine.get("robot-7", owner="carol")
    with pytest.raises(SessionExists):
        await engine.create(session_id="robot-7", owner="alice")
    for bad in ["", "-x", "a/b", "x" * 129, "sp ace"]:
        with pytest.raises(InvalidInput, match="session_id"):
            await engine.create(session_id=bad)


async def test_fork_copies_state_and_step_then_diverges(
    engine: SessionService, loaded: dict[str, RecurrentModel]
) -> None:
    model = loaded["gru_stacked"]
    rng = np.random.default_rng(0)
    x1, x2, x3 = (random_inputs(model.contract, n, rng) for n in (4, 3, 2))
    parent = (await engine.create()).session_id
    await engine.step(parent, x1)
    child = await engine.create(fork_from=parent)
    assert child.step == 4
    c2 = await engine.step(child.session_id, x2)
    await engine.step(parent, x3)  # the parent moves on; the child is unaffected
    child_state = await exported_state(engine, child.session_id)
    joined = {"x": np.concatenate([x1["x"], x2["x"]])}
    ref_out = model.run({"x": joined["x"][None]}, np.ones((1, 7), bool), model.contract.initial_states(1))
    np.testing.assert_allclose(c2.outputs["y"], ref_out.outputs["y"][0, 4:], atol=1e-5)
    np.testing.assert_allclose(child_state["h0"], ref_out.states["h0"][0], atol=1e-5)
    with pytest.raises(SessionNotFound):
        await engine.create(fork_from="missing")
    with pytest.raises(InvalidInput, match="fork_from"):
        await engine.create(fork_from=parent, model="tokens")


async def test_reset_and_delete(engine: SessionService) -> None:
    sid = (await engine.create()).session_id
    await engine.step(sid, {"x": np.ones((3, 4), np.float32)})
    assert (await engine.reset(sid)).step == 0
    state = await exported_state(engine, sid)
    assert not state["h0"].any() and int(state["carryover_step"]) == 0
    await engine.delete(sid)
    for call in (
        engine.get(sid),
        engine.reset(sid),
        engine.delete(sid),
        engine.export_state(sid),
        engine.step(sid, {"x": np.ones((1, 4), np.float32)}),
    ):
        with pytest.raises(SessionNotFound):
            await call


async def test_export_import_round_trip(engine: SessionService, loaded: dict[str, RecurrentModel]) -> None:
    model = loaded["gru_stacked"]
    rng = np.random.default_rng(1)
    x1, x2 = random_inputs(model.contract, 5, rng), random_inputs(model.contract, 4, rng)
    a = (await engine.create()).session_id
    await engine.step(a, x1)
    exported = await engine.export_state(a)
    b = (await engine.create()).session_id
    assert (await engine.import_state(b, exported)).step == 5
    rb = await engine.step(b, x2)  # b continues exactly where a was
    ra = await engine.step(a, x2)
    np.testing.assert_array_equal(ra.outputs["y"], rb.outputs["y"])
    state = await exported_state(engine, b)
    assert_matches_offline(
        model,
        {"x": np.concatenate([x1["x"], x2["x"]])},
        {
            "y": np.concatenate(
                [
                    model.run({"x": x1["x"][None]}, np.ones((1, 5), bool), model.contract.initial_states(1)).outputs[
                        "y"
                    ][0],
                    rb.outputs["y"],
                ]
            )
        },
        {"h0": state["h0"]},
    )


def bad_states(fingerprint: str) -> list[tuple[bytes, type[CarryoverError], str]]:
    good = np.zeros((2, 8), np.float32)
    nan = good.copy()
    nan[0, 0] = np.nan
    return [
        (b"not a zip", InvalidInput, "must be an .npz archive"),
        (npz(h0=good, extra=good), InvalidInput, "unknown tensor 'extra'"),
        (npz(c0=good), InvalidInput, "unknown tensor 'c0'"),
        (npz(carryover_step=np.int64(1)), InvalidInput, "state tensor 'h0' is missing"),
        (npz(h0=np.zeros((8, 2), np.float32)), InvalidInput, "has shape [8, 2]; the model expects [2, 8]"),
        (npz(h0=good.astype(np.float64)), InvalidInput, "is float64; the model expects float32"),
        (npz(h0=nan), InvalidInput, "contains NaN or Inf"),
        (npz(h0=good, carryover_step=np.int64(-1)), InvalidInput, "carryover_step"),
        (npz(h0=good, carryover_fingerprint=np.str_("0" * 64)), ModelMismatch, "fingerprint"),
        (npz(h0=np.array([object()], dtype=object)), InvalidInput, "never unpickled"),
    ]


async def test_import_validation_leaves_the_session_as_it_was(engine: SessionService) -> None:
    sid = (await engine.create()).session_id
    await engine.step(sid, {"x": np.ones((2, 4), np.float32)})
    before = await engine.export_state(sid)
    fp = (await engine.get(sid)).fingerprint
    for data, error, message in bad_states(fp):
        with pytest.raises(error) as info:
            await engine.import_state(sid, data)
        assert message in info.value.detail
        assert await engine.export_state(sid) == before


def bad_inputs() -> list[tuple[str, Any, str]]:
    return [
        ("gru", {}, "'inputs' must be an object"),
        ("gru", {"x": [[1, 2, 3, 4]], "z": [[1]]}, "unknown input 'z'"),
        ("gru", {"y": [[1, 2, 3, 4]]}, "unknown input 'y'"),
        ("gru", {"x": [[1, 2, 3]]}, "has shape [1, 3]; the model expects [T, 4]"),
        ("gru", {"x": [1, 2, 3, 4]}, "needs a leading T axis"),
        ("gru", {"x": []}, "T >= 1"),
        ("gru", {"x": [[1, 2, 3, 4], [1, 2]]}, "rectangular"),
        ("gru", {"x": [["a", "b", "c", "d"]]}, "must hold numbers"),
        ("gru", {"x": [[True, False, True, False]]}, "must hold numbers"),
        ("gru", {"x": [[1, 2, float("nan"), 4]]}, "NaN or Inf"),
        ("gru", {"x": [[1, 2, 3, 4], [1, float("inf"), 3, 4]]}, "at timestep 1"),
        ("gru", {"x": [[1e39, 0, 0, 0]]}, "too large for float32"),
        ("gru", {"x": [[0.0] * 4] * 51}, "51 timesteps; the limit per request is 50"),
        ("tokens", {"tokens": [1, 2, 11]}, "token id 11 at timestep 2 is out of range [0, 11)"),
        ("tokens", {"tokens": [-1]}, "out of range"),
        ("tokens", {"tokens": [1.5]}, "integer token ids"),
        ("tokens", {"tokens": [[1], [2]]}, "expects [T]"),
    ]


@pytest.mark.parametrize(("model", "inputs", "message"), bad_inputs())
async def test_bad_input_is_named_and_changes_nothing(
    engine: SessionService, model: str, inputs: Any, message: str
) -> None:
    sid = (await engine.create(model=model)).session_id
    good = {"x": np.ones((2, 4), np.float32)} if model == "gru" else {"tokens": np.array([1, 2])}
    await engine.step(sid, good)
    before = await engine.export_state(sid)
    with pytest.raises(InvalidInput) as info:
        await engine.step(sid, inputs)
    assert message in info.value.detail and info.value.status == 422
    assert await engine.export_state(sid) == before
    with pytest.raises(InvalidInput, match="'step' must be a non-negative integer"):
        await engine.step(sid, good, expected_step=-1)


async def test_max_sessions(redis_url: str, loaded: dict[str, RecurrentModel]) -> None:
    async with running_engine(redis_url, {"gru": loaded["gru_stacked"]}, max_sessions=2) as engine:
        await engine.create()
        await engine.create()
        with pytest.raises(TooManySessions) as info:
            await engine.create()
        assert info.value.status == 429


async def test_counts_across_create_delete_fork_expiry_and_replicas(
    redis_url: str, loaded: dict[str, RecurrentModel]
) -> None:
    """O(1) counting (the store's index): exact across every path that adds or removes a session,
    and the same from two SessionService instances (replicas) on one Redis."""
    models = {"gru": loaded["gru_stacked"]}
    async with running_engine(redis_url, models) as a, running_engine(redis_url, models) as b:
        x = await a.create(owner="alice")
        await b.create(owner="alice", ttl_s=1)
        await b.create(owner="bob", session_id="mine")
        assert await a.count("alice") == (3, 2) and await b.count("bob") == (3, 1)
        await b.create(owner="alice", fork_from=x.session_id)
        with pytest.raises(SessionNotFound):  # another owner's session cannot be forked
            await b.create(owner="bob", fork_from=x.session_id)
        assert await a.count("alice") == (4, 3)
        await b.delete(x.session_id, owner="alice")
        with pytest.raises(SessionNotFound):
            await a.delete("mine", owner="alice")  # bob's: absent for alice, not uncounted
        assert await a.count("alice") == (3, 2)
        await asyncio.sleep(1.2)  # the 1 s session expires
        assert await b.count("alice") == (2, 1) and await a.count("bob") == (2, 1)


async def test_max_sessions_per_key(redis_url: str, loaded: dict[str, RecurrentModel]) -> None:
    models = {"gru": loaded["gru_stacked"]}
    async with (
        running_engine(redis_url, models, max_sessions_per_key=2) as a,
        running_engine(redis_url, models, max_sessions_per_key=2) as b,
    ):
        first = await a.create(owner="alice")
        await b.create(owner="alice")
        with pytest.raises(TooManySessions, match="API key holds its limit of 2") as info:
            await a.create(owner="alice")
        assert (info.value.status, info.value.retry_after) == (429, 1.0)
        with pytest.raises(TooManySessions):  # the other replica sees the same count
            await b.create(owner="alice", fork_from=first.session_id)
        await b.create(owner="bob")
        await b.delete(first.session_id, owner="alice")
        await a.create(owner="alice")


async def test_admit_is_a_rate_limit_per_owner(redis_url: str, loaded: dict[str, RecurrentModel]) -> None:
    async with running_engine(redis_url, {"gru": loaded["gru_stacked"]}, rate_limit_rps=1, rate_limit_burst=2) as e:
        await e.admit("alice")
        await e.admit("alice")
        with pytest.raises(RateLimited) as info:
            await e.admit("alice")
        assert info.value.status == 429 and 0 < (info.value.retry_after or 0) <= 1
        await e.admit("bob")
    async with running_engine(redis_url, {"gru": loaded["gru_stacked"]}) as off:
        for _ in range(10):
            await off.admit("alice")  # rate_limit_rps 0: no limit, no Redis call


async def test_embedded_redis_persists_across_engine_restarts(
    tmp_path: Path, loaded: dict[str, RecurrentModel]
) -> None:
    """No Redis URL: a real embedded Redis under the data dir, AOF on, same code path."""
    from service.config import Settings
    from service.store.embedded import redis_or_embedded
    from service.store.store import SessionStore

    model = loaded["gru_stacked"]
    x = random_inputs(model.contract, 6, np.random.default_rng(2))
    async with redis_or_embedded(None, tmp_path / "data") as url:
        store = await SessionStore.connect(url)
        service = SessionService(Settings(data_dir=tmp_path / "data"), store, {"gru": model})
        await service.start()
        sid = (await service.create()).session_id
        reply = await service.step(sid, x)
        await service.stop()
        await store.close()

    async with redis_or_embedded(None, tmp_path / "data") as url:
        store = await SessionStore.connect(url)
        service = SessionService(Settings(data_dir=tmp_path / "data"), store, {"gru": model})
        await service.start()
        try:
            state = await exported_state(service, sid)
            assert int(state["carryover_step"]) == 6
            assert_matches_offline(model, x, reply.outputs, {"h0": state["h0"]})
        finally:
            await service.stop()
            await store.close()


# -- the contract every transport calls ---------------------------------------------------------
def test_parse_step_is_the_one_envelope_parser() -> None:
    assert parse_step({"inputs": {"x": [[1]]}}) == StepCall({"x": [[1]]}, None)
    assert parse_step({"inputs": {"x": [[1]]}, "step": 3}) == StepCall({"x": [[1]]}, 3)
    assert parse_step({"inputs": {}, "id": 1}, transport_fields=frozenset({"id"})).inputs == {}
    for body, words in [
        ([1], "JSON object"),
        ({"step": 0}, "'inputs'"),
        ({"inputs": [[1]]}, "'inputs'"),
        ({"inputs": {}, "id": 1}, "'id'"),
        ({"inputs": {}, "steps": 1}, "'steps'"),
        ({"inputs": {}, "step": True}, "'step'"),
        ({"inputs": {}, "step": -1}, "'step'"),
        ({"inputs": {}, "step": 1.5}, "'step'"),
        ({"inputs": {}, "step": "1"}, "'step'"),
    ]:
        with pytest.raises(InvalidInput, match=re.escape(words)):
            parse_step(body)


def test_step_is_strict_everywhere() -> None:
    assert checked_step(None) is None and checked_step(0) == 0
    assert checked_step(2.0) == 2 and StepCall({}, 2.0).expected_step == 2  # type: ignore[arg-type]  # JSON's 2.0
    for bad in (True, False, -1, 2.5, "3"):
        with pytest.raises(InvalidInput, match="'step' must be a non-negative integer"):
            checked_step(bad)
        with pytest.raises(InvalidInput):
            StepCall({}, bad)  # type: ignore[arg-type]


def test_generated_ids_follow_the_one_session_id_rule() -> None:
    ids = {new_session_id() for _ in range(2000)}
    assert len(ids) == 2000 and all(is_session_id(i) and len(i) == 22 for i in ids)
    assert not any(is_session_id(bad) for bad in ("", "-x", "_x", "a/b", "x" * 129, "sp ace", "a:b", None))


async def test_a_path_id_that_breaks_the_rule_is_simply_not_found(engine: SessionService) -> None:
    for bad in ("-x", "a b", "x" * 129, "alice:robot"):
        for call in (
            engine.get(bad),
            engine.reset(bad),
            engine.delete(bad),
            engine.export_state(bad),
            engine.step(bad, {"x": np.ones((1, 4), np.float32)}),
            engine.create(fork_from=bad),
        ):
            with pytest.raises(SessionNotFound):
                await call


async def test_a_step_routes_then_the_scheduler_checks_the_owner(engine: SessionService) -> None:
    """Two models: routing reads the record's model; the owner is checked on the batch's read."""
    await engine.create(session_id="shared-name", owner="alice")
    with pytest.raises(SessionNotFound):
        await engine.step("shared-name", {"x": np.ones((1, 4), np.float32)}, owner="bob")
    reply = await engine.apply("shared-name", StepCall({"x": np.ones((2, 4), np.float32)}, 0), owner="alice")
    assert (reply.session_id, reply.step) == ("shared-name", 2)


async def test_ping_is_readiness(engine: SessionService, tmp_path: Path, loaded: dict[str, RecurrentModel]) -> None:
    await engine.ping()
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    try:
        async with running_engine(redis.url, {"gru": loaded["gru_stacked"]}, redis_timeout_s=0.5) as other:
            await other.ping()
            redis.stop(kill=True)
            with pytest.raises(Unavailable, match="does not answer"):
                await other.ping()
    finally:
        redis.stop(kill=True)
