"""The record codec, and a corrupt record end to end: only that session's requests fail (docs/contract.md §2)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import redis

from model_export.verify import random_inputs
from service.engine.model import RecurrentModel
from service.errors import SessionCorrupt, SessionNotFound
from service.store.record import SessionRecord, decode, encode, new_write_token, session_key
from tests.engines import assert_matches_offline, exported_state, running_engine
from tests.live_server import live_server
from tests.redis_fixture import RedisServer
from tests.service.store.test_store import record


def stored(rec: SessionRecord, pttl_ms: int = 5000) -> list[Any]:
    """What the load script returns for ``rec``: {flat field/value list, pttl, replay copy} (bytes,
    as from Redis; the replay copy is None, Redis's nil, when empty)."""
    flat = [v.encode() if isinstance(v, str) else v for v in encode(rec)]
    return [[*flat, b"w", b"token"], pttl_ms, rec.last_reply or None]


# -- the codec ----------------------------------------------------------------------------------


def test_write_tokens_never_repeat_in_a_process_or_across_a_fork() -> None:
    """The token names one write (the store's CAS and resend checks rely on it): a forked worker
    must not draw the tokens its parent draws next."""
    ours = [new_write_token() for _ in range(1000)]
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe and exits
        os.write(write, " ".join(new_write_token() for _ in range(1000)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        theirs = pipe.read().split()
    os.waitpid(child, 0)
    ours += [new_write_token() for _ in range(1000)]
    assert len(theirs) == 1000 and len(set(ours) | set(theirs)) == 3000


def test_a_record_survives_encode_and_decode() -> None:
    rec = replace(record("a/é"), states=(b"", b"\x00" * 3), last_digest="d", last_reply=b"\x00r")
    got = decode(session_key("a/é"), stored(rec, 2500))
    assert got == replace(rec, expires_in=2.5)
    assert b"last_reply" not in encode(rec) and b"\x00r" not in encode(rec)  # the replay copy is another key
    lean = decode("k", stored(rec)[:2])  # a batch load: no replay copy asked for
    assert isinstance(lean, SessionRecord) and lean.last_reply == b"" and lean.last_digest == "d"
    assert decode("k", None) is None
    no_ttl = decode("k", stored(rec, -1))
    assert isinstance(no_ttl, SessionRecord) and no_ttl.expires_in is None


def _without(field: bytes) -> Callable[[list[Any]], list[Any]]:
    def change(reply: list[Any]) -> list[Any]:
        flat = reply[0]
        i = flat.index(field)
        return [flat[:i] + flat[i + 2 :], *reply[1:]]

    return change


def _with(field: bytes, value: bytes) -> Callable[[list[Any]], list[Any]]:
    def change(reply: list[Any]) -> list[Any]:
        flat = list(reply[0])
        flat[flat.index(field) + 1] = value
        return [flat, *reply[1:]]

    return change


@pytest.mark.parametrize(
    "change",
    [
        _without(b"meta"),
        _without(b"revision"),
        _without(b"ttl_s"),
        _without(b"s0"),  # s1 left: a gap in the state fields
        _with(b"meta", b"{not json"),
        _with(b"meta", b"[1, 2]"),
        _with(b"meta", orjson.dumps({"session_id": "x"})),  # fields missing from meta
        _with(b"revision", b"one"),
        lambda reply: [reply[0][:-1], reply[1]],  # an odd field/value list
        lambda reply: [reply[0], b"soon"],
        lambda reply: [reply[0]],
    ],
)
def test_a_malformed_record_decodes_to_session_corrupt(change: Callable[[list[Any]], list[Any]]) -> None:
    rec = replace(record("x"), states=(b"a", b"b"))
    got = decode(session_key("x"), change(stored(rec)))
    assert isinstance(got, SessionCorrupt) and got.code == "session_corrupt" and got.status == 500
    assert session_key("x") in got.detail


def test_another_redis_type_decodes_to_session_corrupt() -> None:
    got = decode("k", b"string")  # the load script's answer for a key that is not a hash
    assert isinstance(got, SessionCorrupt) and "holds a Redis string" in got.detail


# -- a corrupt record through the engine and the HTTP API ---------------------------------------


def corrupt(raw: redis.Redis, session_id: str, how: str) -> None:
    """Damage a stored session by hand, as another program or a bad restore would."""
    key = session_key(session_id)
    if how == "garbage":
        raw.delete(key)
        raw.set(key, b"\x00\xff garbage \x80")
    elif how == "missing_field":
        raw.hdel(key, "meta")
    elif how == "bad_meta":
        raw.hset(key, "meta", b"\x00\xff")
    elif how == "truncated_state":
        state = raw.hget(key, "s0")
        assert isinstance(state, bytes)
        raw.hset(key, "s0", state[:-3])
    else:
        raise AssertionError(how)


HOWS = ["garbage", "missing_field", "bad_meta", "truncated_state"]


@pytest.fixture
def raw(redis_server: RedisServer) -> Iterator[redis.Redis]:
    with redis_server.client() as c:
        yield c


async def test_a_corrupt_session_fails_alone_in_its_batch(
    redis_url: str, raw: redis.Redis, loaded: dict[str, RecurrentModel]
) -> None:
    model = loaded["gru_stacked"]
    rng = np.random.default_rng(3)
    async with running_engine(redis_url, {"gru": model}, max_batch_size=64) as engine:
        good = [(await engine.create()).session_id for _ in range(3)]
        bad = {how: (await engine.create()).session_id for how in HOWS}
        for how, sid in bad.items():
            corrupt(raw, sid, how)
        loads: list[list[str]] = []
        original = engine.store.load

        async def spy(ids: list[str], **kwargs: Any) -> Any:
            loads.append(list(ids))
            return await original(ids, **kwargs)

        engine.store.load = spy  # type: ignore[method-assign,assignment]
        inputs = {sid: random_inputs(model.contract, 5, rng) for sid in [*good, *bad.values()]}
        results = await asyncio.gather(*(engine.step(sid, x) for sid, x in inputs.items()), return_exceptions=True)
        engine.store.load = original  # type: ignore[method-assign]

        assert sorted(inputs) in [sorted(ids) for ids in loads]  # one batch held them all
        by_id = dict(zip(inputs, results, strict=True))
        for sid in bad.values():
            assert isinstance(by_id[sid], SessionCorrupt), by_id[sid]
        for sid in good:
            reply = by_id[sid]
            assert not isinstance(reply, BaseException), reply
            state = await exported_state(engine, sid)
            assert int(state["carryover_step"]) == 5
            states = {s.input: state[s.input] for s in model.contract.states}
            assert_matches_offline(model, inputs[sid], reply.outputs, states)

        for how in ("garbage", "missing_field", "bad_meta"):  # the record itself is unreadable
            with pytest.raises(SessionCorrupt):
                await engine.get(bad[how])
        for sid in bad.values():  # delete still works, whatever the key holds
            await engine.delete(sid)
            with pytest.raises(SessionNotFound):
                await engine.get(sid)


async def test_a_corrupt_session_is_a_500_session_corrupt_over_http(
    redis_url: str, raw: redis.Redis, loaded: dict[str, RecurrentModel]
) -> None:
    model = loaded["gru_stacked"]
    x = random_inputs(model.contract, 2, np.random.default_rng(4))
    body = {"inputs": {k: v.tolist() for k, v in x.items()}}
    with live_server(redis_url, {"gru": model}) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:

            async def create() -> str:
                r = await client.post("/v1/sessions", json={})
                assert r.status_code == 201, r.text
                return str(r.json()["session_id"])

            good, bad = await create(), {how: await create() for how in HOWS}
            for how, sid in bad.items():
                corrupt(raw, sid, how)
            ids = [good, *bad.values()]
            replies = await asyncio.gather(*(client.post(f"/v1/sessions/{sid}/step", json=body) for sid in ids))
            assert replies[0].status_code == 200, replies[0].text
            for r in replies[1:]:
                assert r.status_code == 500 and r.json()["code"] == "session_corrupt", r.text
                assert r.headers["content-type"].startswith("application/problem+json")
            for how in ("garbage", "missing_field", "bad_meta"):
                r = await client.get(f"/v1/sessions/{bad[how]}")
                assert r.status_code == 500 and r.json()["code"] == "session_corrupt", r.text
            for sid in bad.values():
                assert (await client.delete(f"/v1/sessions/{sid}")).status_code == 204
                assert (await client.get(f"/v1/sessions/{sid}")).status_code == 404
            assert (await client.get(f"/v1/sessions/{good}")).json()["step"] == 2
