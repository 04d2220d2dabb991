"""The HTTP API end to end: a real uvicorn on a free port, real Redis, real ONNX Runtime, httpx."""

from __future__ import annotations

import asyncio
import io
import logging
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from model_export.verify import random_inputs
from service.api.state import app_state
from service.engine.model import RecurrentModel
from tests.engines import assert_matches_offline, offline
from tests.live_server import API_MODELS, LiveServer, live_server
from tests.redis_fixture import RedisServer

PROBLEM = "application/problem+json"
JSON = {"content-type": "application/json"}
MAX_STEPS = 1000  # the api_server's max_steps_per_request
MAX_BODY = 256 * 1024  # and its max_body_bytes

Snapshot = tuple[int, dict[str, tuple[str, tuple[int, ...], bytes]]]


@pytest.fixture
async def client(api_server: LiveServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=api_server.url, timeout=30) as c:
        yield c


# -- helpers --------------------------------------------------------------------------------------
def db_url(redis: RedisServer, db: int) -> str:
    """Another logical database of a Redis server, emptied: a server of its own within it."""
    with redis.client() as c:
        c.select(db)
        c.flushdb()
    return redis.url.rsplit("/", 1)[0] + f"/{db}"


async def create(client: httpx.AsyncClient, **body: Any) -> str:
    r = await client.post("/v1/sessions", json=body)
    assert r.status_code == 201, r.text
    return str(r.json()["session_id"])


def step_body(inputs: dict[str, np.ndarray], step: int | None = None) -> bytes:
    body: dict[str, Any] = {"inputs": {k: v.tolist() for k, v in inputs.items()}}
    if step is not None:
        body["step"] = step
    return orjson.dumps(body)


async def step(
    client: httpx.AsyncClient, sid: str, inputs: dict[str, np.ndarray], expected: int | None = None
) -> httpx.Response:
    return await client.post(f"/v1/sessions/{sid}/step", content=step_body(inputs, expected), headers=JSON)


def outputs_of(r: httpx.Response) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, dtype=np.float32) for k, v in r.json()["outputs"].items()}


def npz(content: bytes) -> dict[str, np.ndarray]:
    archive = np.load(io.BytesIO(content), allow_pickle=False)
    return {k: archive[k] for k in archive.files}


async def snapshot(client: httpx.AsyncClient, sid: str) -> Snapshot:
    """The session's step and exported state, byte for byte (the .npz's zip timestamps aside)."""
    meta = await client.get(f"/v1/sessions/{sid}")
    assert meta.status_code == 200, meta.text
    state = await client.get(f"/v1/sessions/{sid}/state")
    assert state.status_code == 200 and state.headers["content-type"] == "application/x-npz"
    arrays = {k: (v.dtype.str, v.shape, v.tobytes()) for k, v in npz(state.content).items()}
    return int(meta.json()["step"]), arrays


def assert_problem(r: httpx.Response, status: int, code: str, *words: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM, r.headers
    body: dict[str, Any] = r.json()
    assert {"type", "title", "status", "detail", "code", "request_id"} <= set(body), body
    assert (body["status"], body["code"]) == (status, code), body
    assert body["type"].endswith("/" + code)
    assert body["request_id"] == r.headers["x-request-id"]
    for word in words:
        assert word in body["detail"], (word, body["detail"])
    return body


def concat(chunks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


# -- models, lifecycle ----------------------------------------------------------------------------
async def test_models_describes_each_served_model(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/models")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    models = {m["name"]: m for m in r.json()["models"]}
    assert list(models) == list(API_MODELS)
    gru, tokens = models["gru"], models["tokens"]
    assert gru["default"] and gru["kind"] == "features" and len(gru["fingerprint"]) == 64
    assert gru["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["T", 4]}]
    assert gru["states"][0]["input"] == "h0" and "vocab" not in gru
    assert tokens["kind"] == "token_lm" and tokens["vocab"] == "abcdefghij\ufffd" and tokens["unk_id"] == 10
    assert models["lstm_step"]["form"] == "step"


async def test_session_lifecycle(client: httpx.AsyncClient, loaded: dict[str, RecurrentModel]) -> None:
    r = await client.post("/v1/sessions")  # no body at all: the default model
    assert r.status_code == 201, r.text
    created = r.json()
    sid = created["session_id"]
    assert r.headers["location"] == f"/v1/sessions/{sid}"
    assert created["model"] == "gru" and created["step"] == 0 and created["expires_in"] > 0
    assert created["fingerprint"] == loaded["gru_stacked"].fingerprint

    x = random_inputs(loaded["gru_stacked"].contract, 5, np.random.default_rng(1))
    r = await step(client, sid, x)
    assert r.status_code == 200 and r.json()["step"] == 5 and r.json()["session_id"] == sid
    assert "idempotent-replay" not in r.headers

    # No Content-Type at all (curl -d without -H), or JSON with a charset, is fine too.
    for headers in ({}, {"content-type": "application/json; charset=utf-8"}):
        r = await client.post(f"/v1/sessions/{sid}/step", content=step_body(x), headers=headers)
        assert r.status_code == 200, r.text

    meta = (await client.get(f"/v1/sessions/{sid}")).json()
    assert set(meta) == {"session_id", "model", "fingerprint", "step", "expires_in", "created_at", "updated_at"}
    assert meta["step"] == 15 and meta["created_at"] <= meta["updated_at"]

    r = await client.post(f"/v1/sessions/{sid}/reset")
    assert r.status_code == 204 and r.content == b""
    step_after, state = await snapshot(client, sid)
    assert step_after == 0 and not np.frombuffer(state["h0"][2], np.float32).any()

    assert (await client.delete(f"/v1/sessions/{sid}")).status_code == 204
    assert_problem(await client.get(f"/v1/sessions/{sid}"), 404, "session_not_found", sid)
    assert_problem(await client.delete(f"/v1/sessions/{sid}"), 404, "session_not_found")


async def test_create_options(client: httpx.AsyncClient, loaded: dict[str, RecurrentModel]) -> None:
    sid = await create(client, model="tokens", session_id="my-tokens.1", ttl_s=120)
    meta = (await client.get("/v1/sessions/my-tokens.1")).json()
    assert sid == "my-tokens.1" and meta["model"] == "tokens" and 100 < meta["expires_in"] <= 120
    assert_problem(
        await client.post("/v1/sessions", json={"session_id": "my-tokens.1"}), 409, "session_exists", "my-tokens.1"
    )
    assert_problem(await client.post("/v1/sessions", json={"model": "nope"}), 404, "model_not_found", "nope")
    assert_problem(await client.post("/v1/sessions", json={"fork_from": "nope"}), 404, "session_not_found")
    for body, name in [({"ttl_s": 0}, "ttl_s"), ({"ttl_s": "60"}, "ttl_s"), ({"session_id": "a b"}, "session_id")]:
        r = await client.post("/v1/sessions", json=body)
        assert assert_problem(r, 422, "invalid_input", name)["errors"][0]["loc"] == ["body", name]
    assert_problem(await client.post("/v1/sessions", json={"modle": "gru"}), 422, "invalid_input", "modle")
    r = await client.post("/v1/sessions", content=b'{"model": ', headers=JSON)
    assert_problem(r, 400, "invalid_json")
    r = await client.post("/v1/sessions", content=b"model=gru", headers={"content-type": "text/plain"})
    assert_problem(r, 415, "unsupported_media_type", "text/plain")

    # A fork starts from a copy of the source's state and step, then goes its own way.
    model = loaded["token_gru"]
    rng = np.random.default_rng(2)
    first, more = random_inputs(model.contract, 6, rng), random_inputs(model.contract, 3, rng)
    assert (await step(client, sid, first)).status_code == 200
    fork = await create(client, fork_from=sid)
    assert (await client.get(f"/v1/sessions/{fork}")).json()["step"] == 6
    a, b = await step(client, sid, more), await step(client, fork, more)
    assert a.json()["step"] == b.json()["step"] == 9 and a.json()["outputs"] == b.json()["outputs"]
    assert (await snapshot(client, sid))[1]["h0"] == (await snapshot(client, fork))[1]["h0"]


# -- parity ---------------------------------------------------------------------------------------
async def test_concurrent_sessions_equal_their_offline_runs(
    client: httpx.AsyncClient, loaded: dict[str, RecurrentModel]
) -> None:
    """52 sessions over three models stepping at once, random chunk sizes, some with `step`."""
    rng = np.random.default_rng(7)
    plan = [("gru", 24), ("tokens", 16), ("lstm_step", 12)]
    sessions: list[tuple[str, str, list[dict[str, np.ndarray]]]] = []
    for served, count in plan:
        contract = loaded[API_MODELS[served]].contract
        for _ in range(count):
            sizes = rng.integers(1, 12, size=rng.integers(1, 6))
            sessions.append(
                (served, await create(client, model=served), [random_inputs(contract, int(n), rng) for n in sizes])
            )

    async def drive(sid: str, chunks: list[dict[str, np.ndarray]], with_step: bool) -> list[dict[str, np.ndarray]]:
        outs, done = [], 0
        for chunk in chunks:
            r = await step(client, sid, chunk, done if with_step else None)
            assert r.status_code == 200, r.text
            done += len(next(iter(chunk.values())))
            assert r.json()["step"] == done
            outs.append(outputs_of(r))
        return outs

    results = await asyncio.gather(*(drive(sid, chunks, i % 2 == 0) for i, (_, sid, chunks) in enumerate(sessions)))
    for (served, sid, chunks), outs in zip(sessions, results, strict=True):
        model = loaded[API_MODELS[served]]
        state = npz((await client.get(f"/v1/sessions/{sid}/state")).content)
        assert int(state["carryover_step"]) == sum(len(next(iter(c.values()))) for c in chunks)
        assert str(state["carryover_fingerprint"]) == model.fingerprint
        assert_matches_offline(
            model, concat(chunks), concat(outs), {s.input: state[s.input] for s in model.contract.states}
        )


# -- bad input ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Bad:
    model: str
    body: bytes
    status: int
    code: str
    words: tuple[str, ...]
    headers: dict[str, str] = field(default_factory=lambda: dict(JSON))


def js(value: Any) -> bytes:
    return orjson.dumps(value)


X1 = [[0.5, -1.0, 0.25, 2.0]]
BAD_STEPS = {
    "wrong_feature_size": Bad("gru", js({"inputs": {"x": [[1.0, 2.0, 3.0]]}}), 422, "invalid_input", ("'x'", "[T, 4]")),
    "no_time_axis": Bad("gru", js({"inputs": {"x": X1[0]}}), 422, "invalid_input", ("'x'", "leading T axis")),
    "ragged": Bad("gru", js({"inputs": {"x": [*X1, [1.0]]}}), 422, "invalid_input", ("'x'", "rectangular")),
    "strings": Bad("gru", js({"inputs": {"x": [["a", "b", "c", "d"]]}}), 422, "invalid_input", ("'x'", "strings")),
    "booleans": Bad("gru", js({"inputs": {"x": [[True, False, True, True]]}}), 422, "invalid_input", ("booleans",)),
    "nan_literal": Bad("gru", b'{"inputs": {"x": [[NaN, 0, 0, 0]]}}', 400, "invalid_json", ("NaN",)),
    "infinity_literal": Bad("gru", b'{"inputs": {"x": [[0, Infinity, 0, 0]]}}', 400, "invalid_json", ("JSON",)),
    "float32_overflow": Bad(
        "gru", js({"inputs": {"x": [*X1, [0.0, 1e39, 0.0, 0.0]]}}), 422, "invalid_input", ("'x'", "Inf", "timestep 1")
    ),
    "empty_t": Bad("gru", js({"inputs": {"x": []}}), 422, "invalid_input", ("'x'", "empty")),
    "over_long_t": Bad(
        "gru", js({"inputs": {"x": X1 * (MAX_STEPS + 1)}}), 422, "invalid_input", (str(MAX_STEPS + 1), str(MAX_STEPS))
    ),
    "unknown_input": Bad("gru", js({"inputs": {"x": X1, "z": X1}}), 422, "invalid_input", ("unknown input 'z'",)),
    "missing_input": Bad("gru", js({"inputs": {}}), 422, "invalid_input", ("['x']",)),
    "no_inputs_field": Bad("gru", js({"step": 0}), 422, "invalid_input", ("'inputs'",)),
    "inputs_not_an_object": Bad("gru", js({"inputs": X1}), 422, "invalid_input", ("'inputs'",)),
    "unknown_field": Bad("gru", js({"inputs": {"x": X1}, "steps": 1}), 422, "invalid_input", ("'steps'",)),
    "body_not_an_object": Bad("gru", js([X1]), 422, "invalid_input", ("JSON object",)),
    "negative_step": Bad("gru", js({"inputs": {"x": X1}, "step": -1}), 422, "invalid_input", ("'step'",)),
    "boolean_step": Bad("gru", js({"inputs": {"x": X1}, "step": True}), 422, "invalid_input", ("'step'",)),
    "malformed_json": Bad("gru", b'{"inputs": {"x": [[1, 2', 400, "invalid_json", ("JSON",)),
    "empty_body": Bad("gru", b"", 400, "invalid_json", ("empty",)),
    "wrong_content_type": Bad(
        "gru", js({"inputs": {"x": X1}}), 415, "unsupported_media_type", ("text/plain",), {"content-type": "text/plain"}
    ),
    "over_size_limit": Bad("gru", b" " * (MAX_BODY + 1), 413, "payload_too_large", (str(MAX_BODY),)),
    "token_out_of_range": Bad("tokens", js({"inputs": {"tokens": [3, 11]}}), 422, "invalid_input", ("11", "[0, 11)")),
    "negative_token": Bad("tokens", js({"inputs": {"tokens": [-1]}}), 422, "invalid_input", ("-1", "out of range")),
    "non_integer_token": Bad("tokens", js({"inputs": {"tokens": [1.5]}}), 422, "invalid_input", ("integer token",)),
    "string_token": Bad("tokens", js({"inputs": {"tokens": ["a"]}}), 422, "invalid_input", ("integer token",)),
    "token_feature_axis": Bad("tokens", js({"inputs": {"tokens": [[1]]}}), 422, "invalid_input", ("'tokens'", "[T]")),
}


@pytest.mark.parametrize("case", BAD_STEPS.values(), ids=BAD_STEPS.keys())
async def test_bad_step_is_a_problem_and_changes_nothing(
    client: httpx.AsyncClient, loaded: dict[str, RecurrentModel], case: Bad
) -> None:
    sid = await create(client, model=case.model)
    good = random_inputs(loaded[API_MODELS[case.model]].contract, 3, np.random.default_rng(5))
    assert (await step(client, sid, good)).status_code == 200  # a state that is not the initial one
    before = await snapshot(client, sid)
    r = await client.post(f"/v1/sessions/{sid}/step", content=case.body, headers=case.headers)
    assert_problem(r, case.status, case.code, *case.words)
    assert await snapshot(client, sid) == before
    assert (await step(client, sid, good, expected=3)).json()["step"] == 6  # and the session still works


async def test_body_limit_while_streaming_and_by_content_length(api_server: LiveServer) -> None:
    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it streams in
        for _ in range(8):
            yield b" " * (64 * 1024)

    async with httpx.AsyncClient(base_url=api_server.url) as c:
        sid = await create(c)
        r = await c.post(f"/v1/sessions/{sid}/step", content=chunks(), headers=JSON)
        assert_problem(r, 413, "payload_too_large", str(MAX_BODY))
        r = await c.put(f"/v1/sessions/{sid}/state", content=chunks())
        assert_problem(r, 413, "payload_too_large")

    # A Content-Length over the limit is refused before the body is sent at all.
    def refuse() -> bytes:
        with socket.create_connection(("127.0.0.1", api_server.port), timeout=10) as s:
            s.sendall(
                f"POST /v1/sessions/{sid}/step HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {100 * MAX_BODY}\r\n\r\n".encode()
            )
            reply = b""
            while b"\r\n\r\n" not in reply:
                reply += s.recv(4096)
            return reply

    head = await asyncio.to_thread(refuse)
    assert head.startswith(b"HTTP/1.1 413 ") and b"application/problem+json" in head


async def test_unknown_and_expired_sessions_are_404(client: httpx.AsyncClient) -> None:
    x = {"x": np.zeros((1, 4), np.float32)}
    assert_problem(await step(client, "no-such-session", x), 404, "session_not_found", "no-such-session")
    for method, path in [
        ("GET", ""),
        ("DELETE", ""),
        ("POST", "/reset"),
        ("GET", "/state"),
    ]:
        r = await client.request(method, f"/v1/sessions/no-such-session{path}")
        assert_problem(r, 404, "session_not_found", "no-such-session")
    r = await client.put("/v1/sessions/no-such-session/state", content=b"PK")
    assert_problem(r, 404, "session_not_found")

    sid = await create(client, ttl_s=1)
    await asyncio.sleep(1.3)
    assert_problem(await step(client, sid, x), 404, "session_not_found", "expired")
    assert_problem(await client.get(f"/v1/sessions/{sid}/state"), 404, "session_not_found")


async def test_routing_errors_are_problems(client: httpx.AsyncClient) -> None:
    r = await client.delete("/v1/models")
    assert_problem(r, 405, "method_not_allowed", "DELETE", "GET")
    assert r.headers["allow"] == "GET"
    assert_problem(await client.get("/v1/sessions/abc/step"), 405, "method_not_allowed")
    assert_problem(await client.get("/v1/nothing/here"), 404, "not_found", "/v1/nothing/here")
    assert_problem(await client.post("/v3/models"), 404, "not_found")  # /v2 answers {"error"}: test_v2.py


# -- state export / import ------------------------------------------------------------------------
def state_file(**arrays: Any) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


async def test_state_round_trip(client: httpx.AsyncClient, loaded: dict[str, RecurrentModel]) -> None:
    model = loaded["gru_stacked"]
    rng = np.random.default_rng(11)
    chunks = [random_inputs(model.contract, n, rng) for n in (4, 3)]
    source, target = await create(client), await create(client)
    assert (await step(client, source, chunks[0])).status_code == 200
    exported = (await client.get(f"/v1/sessions/{source}/state")).content
    r = await client.put(
        f"/v1/sessions/{target}/state", content=exported, headers={"content-type": "application/x-npz"}
    )
    assert r.status_code == 200 and r.json()["step"] == 4 and r.json()["session_id"] == target
    assert (await snapshot(client, target))[1]["h0"] == (await snapshot(client, source))[1]["h0"]
    # The imported session continues exactly where the source was.
    out = outputs_of(await step(client, target, chunks[1]))
    ref_out, _ = offline(model, concat(chunks))
    np.testing.assert_allclose(out["y"], ref_out["y"][4:], atol=1e-5, rtol=0)


async def test_bad_state_uploads_change_nothing(client: httpx.AsyncClient, loaded: dict[str, RecurrentModel]) -> None:
    model = loaded["token_gru"]
    sid = await create(client, model="tokens")
    assert (await step(client, sid, random_inputs(model.contract, 4, np.random.default_rng(3)))).status_code == 200
    before = await snapshot(client, sid)
    gru = await create(client)
    foreign = (await client.get(f"/v1/sessions/{gru}/state")).content
    h0 = np.full((2, 8), 0.5, np.float32)
    cases: list[tuple[bytes, int, str, tuple[str, ...]]] = [
        (foreign, 409, "model_mismatch", ("fingerprint",)),  # a gru session's state into a token session
        (state_file(h0=h0, carryover_fingerprint=np.str_("0" * 64)), 409, "model_mismatch", ("fingerprint",)),
        (b"this is not an npz archive", 422, "invalid_input", (".npz",)),
        (state_file(h0=np.zeros((2, 7), np.float32)), 422, "invalid_input", ("'h0'", "shape")),
        (state_file(h0=h0.astype(np.float64)), 422, "invalid_input", ("'h0'", "float64")),
        (state_file(h0=np.full((2, 8), np.nan, np.float32)), 422, "invalid_input", ("NaN",)),
        (state_file(h0=h0, c0=h0), 422, "invalid_input", ("'c0'",)),
        (state_file(h0=h0, carryover_step=np.int64(-3)), 422, "invalid_input", ("carryover_step",)),
        (b"", 422, "invalid_input", ("empty",)),
    ]
    for body, status, code, words in cases:
        r = await client.put(f"/v1/sessions/{sid}/state", content=body)
        assert_problem(r, status, code, *words)
        assert await snapshot(client, sid) == before
    r = await client.put(f"/v1/sessions/{sid}/state", content=foreign, headers={"content-type": "text/csv"})
    assert_problem(r, 415, "unsupported_media_type", "text/csv")
    assert await snapshot(client, sid) == before


# -- idempotency ----------------------------------------------------------------------------------
async def test_idempotent_replay_and_stale_step(client: httpx.AsyncClient, loaded: dict[str, RecurrentModel]) -> None:
    model = loaded["gru_stacked"]
    rng = np.random.default_rng(4)
    a, b = random_inputs(model.contract, 3, rng), random_inputs(model.contract, 2, rng)
    sid = await create(client)
    first = await step(client, sid, a, expected=0)
    again = await step(client, sid, a, expected=0)  # a retry of the same request
    assert first.status_code == again.status_code == 200
    assert "idempotent-replay" not in first.headers and again.headers["idempotent-replay"] == "true"
    assert again.content == first.content and again.json()["step"] == 3
    after_first = await snapshot(client, sid)
    assert after_first[0] == 3

    stale = assert_problem(await step(client, sid, b, expected=0), 409, "step_conflict", "3")
    assert stale["current_step"] == 3
    ahead = assert_problem(await step(client, sid, b, expected=7), 409, "step_conflict")
    assert ahead["current_step"] == 3
    assert await snapshot(client, sid) == after_first

    r = await step(client, sid, b, expected=3)
    assert r.status_code == 200 and r.json()["step"] == 5
    ref_out, _ = offline(model, concat([a, b]))
    np.testing.assert_allclose(outputs_of(r)["y"], ref_out["y"][3:], atol=1e-5, rtol=0)


async def test_a_retry_after_the_window_or_over_the_cap_is_409_never_a_second_apply(
    redis_server: RedisServer, loaded: dict[str, RecurrentModel]
) -> None:
    model = loaded["gru_stacked"]
    rng = np.random.default_rng(5)
    per_step = sum(v.nbytes for v in offline(model, random_inputs(model.contract, 1, rng))[0].values())
    url = db_url(redis_server, 3)
    with redis_server.client() as raw:
        raw.select(3)
        settings = {"replay_window_s": 0.5, "replay_max_bytes": 4 * per_step}
        with live_server(url, {"gru": model}, **settings) as server:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
                sid = await create(c)
                small, big = random_inputs(model.contract, 3, rng), random_inputs(model.contract, 5, rng)
                assert (await step(c, sid, small)).status_code == 200  # no `step`: no replay copy at all
                assert raw.keys("*:r") == []
                assert (await step(c, sid, small, expected=3)).status_code == 200
                assert len(raw.keys("*:r")) == 1
                assert (await step(c, sid, small, expected=3)).headers["idempotent-replay"] == "true"
                await asyncio.sleep(0.7)  # past the window
                late = assert_problem(await step(c, sid, small, expected=3), 409, "step_conflict", "6")
                assert late["current_step"] == 6 and raw.keys("*:r") == []

                assert (await step(c, sid, big, expected=6)).status_code == 200  # 5 steps: over the cap
                assert raw.keys("*:r") == []
                over = assert_problem(await step(c, sid, big, expected=6), 409, "step_conflict", "11")
                assert over["current_step"] == 11
                assert (await c.get(f"/v1/sessions/{sid}")).json()["step"] == 11  # applied once


# -- operations -----------------------------------------------------------------------------------
async def test_health_and_readiness_follow_redis(tmp_path: Path, loaded: dict[str, RecurrentModel]) -> None:
    redis = RedisServer(tmp_path / "redis", appendonly=True)  # the data survives the outage
    redis.start()
    model = loaded["gru_stacked"]
    x = random_inputs(model.contract, 2, np.random.default_rng(9))
    try:
        with live_server(redis.url, {"gru": model}, redis_timeout_s=1.0) as server:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
                assert (await c.get("/readyz")).status_code == 200
                sid = await create(c)
                assert (await step(c, sid, x, expected=0)).status_code == 200

                redis.stop()
                assert (await c.get("/healthz")).status_code == 200  # alive, just not ready
                r = await c.get("/readyz")
                assert_problem(r, 503, "store_unavailable")
                assert int(r.headers["retry-after"]) >= 1
                r = await step(c, sid, x, expected=2)
                assert_problem(r, 503, "store_unavailable")
                assert int(r.headers["retry-after"]) >= 1
                assert_problem(await c.post("/v1/sessions"), 503, "store_unavailable")

                redis.start()
                deadline = time.monotonic() + 20
                while (await c.get("/readyz")).status_code != 200:
                    assert time.monotonic() < deadline, "never ready again"
                    await asyncio.sleep(0.05)
                r = await step(c, sid, x, expected=2)  # nothing of the failed request was applied
                assert r.status_code == 200 and r.json()["step"] == 4
    finally:
        redis.stop()


async def test_graceful_shutdown_keeps_every_acknowledged_step(
    redis_server: RedisServer, loaded: dict[str, RecurrentModel]
) -> None:
    """Stop the server while sessions are stepping: every 200 is in the stored state, and each
    session holds a whole number of requests (at most one unacknowledged one past the last 200)."""
    model = loaded["gru_stacked"]
    url = db_url(redis_server, 1)
    rng = np.random.default_rng(12)
    n_sessions, n_chunks = 16, 40
    plans = [[random_inputs(model.contract, int(n), rng) for n in rng.integers(1, 7, n_chunks)] for _ in range(16)]
    acked = [0] * n_sessions
    late: list[str] = []  # sessions with a 200 received after stop() was called
    stopping = asyncio.Event()
    with live_server(url, {"gru": model}) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            ids = [await create(c) for _ in range(n_sessions)]

            async def drive(i: int) -> None:
                done = 0
                for chunk in plans[i]:
                    try:
                        r = await step(c, ids[i], chunk, expected=done)
                    except httpx.TransportError:
                        return
                    if r.status_code != 200:
                        assert_problem(r, 503, "shutting_down")
                        return
                    done = r.json()["step"]
                    acked[i] += 1
                    if stopping.is_set():
                        late.append(ids[i])

            drivers = asyncio.gather(*(drive(i) for i in range(n_sessions)))
            while sum(acked) < n_sessions:
                await asyncio.sleep(0.005)
            stopping.set()
            await asyncio.to_thread(server.stop)
            await drivers
    assert any(a < n_chunks for a in acked), "the shutdown came too late to interrupt anything"
    assert late, "no request was answered while the server was stopping"

    with live_server(url, {"gru": model}) as again:
        async with httpx.AsyncClient(base_url=again.url, timeout=30) as c:
            for sid, chunks, n_acked in zip(ids, plans, acked, strict=True):
                state = npz((await c.get(f"/v1/sessions/{sid}/state")).content)
                prefix = np.cumsum([0] + [len(ch["x"]) for ch in chunks])
                applied = int(np.searchsorted(prefix, int(state["carryover_step"])))
                assert prefix[applied] == int(state["carryover_step"]), "a request was half applied"
                assert applied in (n_acked, n_acked + 1), (applied, n_acked)
                if applied:
                    _, ref_state = offline(model, concat(chunks[:applied]))
                    np.testing.assert_allclose(state["h0"], ref_state["h0"], atol=1e-5, rtol=0)


async def test_limits_sessions_and_queue(redis_server: RedisServer, loaded: dict[str, RecurrentModel]) -> None:
    model = loaded["gru_stacked"]
    with live_server(db_url(redis_server, 2), {"gru": model}, max_sessions=3, max_queue=1) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            ids = [await create(c) for _ in range(3)]
            assert_problem(await c.post("/v1/sessions"), 429, "too_many_sessions", "3")
            x = random_inputs(model.contract, 50, np.random.default_rng(0))
            replies = await asyncio.gather(*(step(c, ids[i % 3], x) for i in range(40)))
            overloaded = [r for r in replies if r.status_code == 503]
            assert overloaded and all(r.status_code == 200 for r in replies if r not in overloaded)
            assert_problem(overloaded[0], 503, "overloaded")
            assert int(overloaded[0].headers["retry-after"]) >= 1
            steps = sum([(await c.get(f"/v1/sessions/{sid}")).json()["step"] for sid in ids])
            assert steps == 50 * (len(replies) - len(overloaded))  # a refused request applied nothing


async def test_request_ids_and_access_log(client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="service.access"):
        r = await client.get("/v1/sessions/nope", headers={"X-Request-ID": "client-id_1.2"})
        assert r.headers["x-request-id"] == "client-id_1.2" and r.json()["request_id"] == "client-id_1.2"
        for insane in (b"has space", b"x" * 129, "ünïcode".encode(), b"a\\b"):
            r = await client.get("/healthz", headers={b"X-Request-ID": insane})
            generated = r.headers["x-request-id"]
            assert len(generated) == 32 and int(generated, 16) >= 0
        deadline = time.monotonic() + 5  # the server thread logs after the response went out
        while not any(getattr(rec, "request_id", None) == "client-id_1.2" for rec in caplog.records):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
    record = next(rec for rec in caplog.records if getattr(rec, "request_id", None) == "client-id_1.2")
    assert (record.method, record.route, record.status) == ("GET", "/v1/sessions/{session_id}", 404)  # type: ignore[attr-defined]
    assert record.duration_ms >= 0 and "request_id=client-id_1.2" in record.getMessage()  # type: ignore[attr-defined]


async def test_the_access_log_is_off_by_default_and_requests_are_still_counted(
    redis_server: RedisServer, loaded: dict[str, RecurrentModel], caplog: pytest.LogCaptureFixture
) -> None:
    with (
        live_server(db_url(redis_server, 4), {"gru": loaded["gru_stacked"]}) as server,
        caplog.at_level(logging.INFO, logger="service.access"),
    ):
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            assert (await c.get("/v1/sessions/nope")).status_code == 404
            await asyncio.sleep(0.2)  # the line would be written right after the response
            scrape = (await c.get("/metrics")).text
    assert not [r for r in caplog.records if r.name == "service.access"]
    counted = {
        (m.labels["route"], m.labels["status"]): m.value
        for family in text_string_to_metric_families(scrape)
        if family.name == "carryover_http_requests"
        for m in family.samples
        if m.name == "carryover_http_requests_total"
    }
    assert counted[("/v1/sessions/{session_id}", "404")] == 1


async def test_unexpected_error_is_a_logged_500(
    api_server: LiveServer, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def boom() -> None:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(app_state(api_server.app).session_service(), "describe_models", boom)
    with caplog.at_level(logging.ERROR, logger="service.api.middleware"):
        r = await client.get("/v1/models")
    body = assert_problem(r, 500, "internal", r.headers["x-request-id"])
    assert "secret" not in body["detail"]
    assert any("RuntimeError" in (rec.exc_text or "") or rec.exc_info for rec in caplog.records)


async def test_openapi_documents_every_route(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    paths = spec["paths"]
    expected = {
        ("/v1/models", "get"): "listModels",
        ("/v1/sessions", "post"): "createSession",
        ("/v1/sessions/{session_id}", "get"): "getSession",
        ("/v1/sessions/{session_id}", "delete"): "deleteSession",
        ("/v1/sessions/{session_id}/step", "post"): "stepSession",
        ("/v1/sessions/{session_id}/generate", "post"): "generate",
        ("/v1/sessions/{session_id}/reset", "post"): "resetSession",
        ("/v1/sessions/{session_id}/state", "get"): "exportState",
        ("/v1/sessions/{session_id}/state", "put"): "importState",
    }
    documented = {(p, m) for p, ops in paths.items() if p.startswith("/v1") for m in ops}
    assert documented == set(expected)
    for (path, method), op_id in expected.items():
        op = paths[path][method]
        assert op["operationId"] == op_id
        errors = {s: r for s, r in op["responses"].items() if s[0] in "45"}
        assert errors and "500" in errors, (path, method)
        for response in errors.values():
            assert response["content"] == {PROBLEM: {"schema": {"$ref": "#/components/schemas/Problem"}}}

    def body_ref(path: str, method: str, media: str = "application/json") -> Any:
        return paths[path][method]["requestBody"]["content"][media]["schema"]

    def ok_ref(path: str, method: str, status: str = "200") -> Any:
        return paths[path][method]["responses"][status]["content"]["application/json"]["schema"]["$ref"]

    assert "CreateSessionRequest" in orjson.dumps(body_ref("/v1/sessions", "post")).decode()
    assert body_ref("/v1/sessions/{session_id}/step", "post") == {"$ref": "#/components/schemas/StepRequest"}
    assert paths["/v1/sessions/{session_id}/step"]["post"]["requestBody"]["required"] is True
    assert body_ref("/v1/sessions/{session_id}/state", "put", "application/x-npz")["format"] == "binary"
    assert ok_ref("/v1/models", "get").endswith("/ModelsResponse")
    assert ok_ref("/v1/sessions", "post", "201").endswith("/SessionCreated")
    assert ok_ref("/v1/sessions/{session_id}", "get").endswith("/SessionMetadata")
    assert ok_ref("/v1/sessions/{session_id}/step", "post").endswith("/StepResponse")
    assert ok_ref("/v1/sessions/{session_id}/state", "put").endswith("/SessionMetadata")
    assert "application/x-npz" in paths["/v1/sessions/{session_id}/state"]["get"]["responses"]["200"]["content"]
    assert "204" in paths["/v1/sessions/{session_id}"]["delete"]["responses"]
    assert "Retry-After" in paths["/v1/sessions/{session_id}/step"]["post"]["responses"]["503"]["headers"]
    for ops in paths.values():
        for op in ops.values():
            assert all("X-Request-ID" in response["headers"] for response in op["responses"].values())

    schemas = spec["components"]["schemas"]
    assert {"inputs", "step"} <= set(schemas["StepRequest"]["properties"]) and schemas["StepRequest"]["examples"]
    assert {"type", "title", "status", "detail", "code", "current_step"} <= set(schemas["Problem"]["properties"])
    assert "HTTPValidationError" not in orjson.dumps(spec).decode()
    for op in ("healthz", "readyz", "metrics"):
        assert any(o.get("operationId") == op for ops in paths.values() for o in ops.values())


async def test_metrics_by_route_template_and_batches(client: httpx.AsyncClient) -> None:
    sid = await create(client)
    for n in (1, 3):
        assert (await step(client, sid, {"x": np.zeros((n, 4), np.float32)})).status_code == 200
    await client.get(f"/v1/sessions/{sid}")
    text = (await client.get("/metrics")).text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    step_route = "/v1/sessions/{session_id}/step"
    assert value("carryover_http_requests_total", route=step_route, method="POST", status="200") >= 2
    assert value("carryover_http_requests_total", route="/v1/sessions", method="POST", status="201") >= 1
    assert value("carryover_http_request_seconds_count", route=step_route) >= 2
    assert not any(sid in str(labels) for _, labels in samples), "raw paths must never become labels"
    assert value("carryover_batch_rows_count", model="gru") >= 2
    assert value("carryover_batch_padding_ratio_count", model="gru") >= 2
    assert value("carryover_redis_seconds_count", op="load") >= 2
    # The per-stage breakdown: queue wait, Redis read/write, model run, serialisation.
    assert value("carryover_queue_wait_seconds_count", model="gru") >= 2
    assert value("carryover_redis_seconds_count", op="save") >= 2
    assert value("carryover_model_run_seconds_count", model="gru") >= 2
    assert value("carryover_serialization_seconds_count", transport="http") >= 2
    assert ("carryover_serialization_seconds_count", (("transport", "ws"),)) in samples
    names = {name for name, _ in samples}
    assert {"carryover_queue_depth", "carryover_sessions", "carryover_websocket_connections"} <= names
    assert ("carryover_queue_depth", (("model", "lstm_step"),)) in samples  # every model, even before its first batch
