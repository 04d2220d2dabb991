"""WebSocket streaming (service/api/ws.py) against a real uvicorn, real Redis and the ``websockets``
client: parity with the offline run under pipelining, ordering, every bad-message path, close codes."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Coroutine, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from model_export.verify import random_inputs
from service.api.state import app_state
from service.api.ws_protocol import REPLY_HEADER
from service.engine.model import RecurrentModel
from tests.engines import assert_matches_offline
from tests.live_server import API_MODELS, LiveServer, live_server
from tests.redis_fixture import RedisServer

TIMEOUT_S = 30.0
PROBLEM_FIELDS = {"type", "problem_type", "title", "status", "detail", "code"}

Frame = str | bytes


# -- helpers -------------------------------------------------------------------------------------------
async def recv(ws: ClientConnection) -> Frame:
    return await asyncio.wait_for(ws.recv(), TIMEOUT_S)


async def recv_json(ws: ClientConnection) -> dict[str, Any]:
    raw = await recv(ws)
    assert isinstance(raw, str), f"expected a text frame, got {len(raw)} bytes"
    message: dict[str, Any] = orjson.loads(raw)
    return message


async def close_code(ws: ClientConnection) -> int:
    """The code of the server's close; fails if anything but a close arrives first."""
    with pytest.raises(ConnectionClosed) as closed:
        extra = await recv(ws)
        pytest.fail(f"expected the close, got {extra!r:.200}")
    assert closed.value.rcvd is not None, "the connection dropped without a close frame"
    return closed.value.rcvd.code


async def open_stream(server: LiveServer, path: str) -> tuple[ClientConnection, dict[str, Any]]:
    ws = await connect(server.ws_url + path, max_size=None, open_timeout=TIMEOUT_S)
    hello = await recv_json(ws)
    return ws, hello


def chunk_frame(name: str, array: np.ndarray, *, binary: bool, step: int | None = None, chunk_id: Any = None) -> Frame:
    if binary:
        return np.ascontiguousarray(array, dtype="<i4" if array.dtype.kind in "iu" else "<f4").tobytes()
    body: dict[str, Any] = {"inputs": {name: array.tolist()}}
    if step is not None:
        body["step"] = step
    if chunk_id is not None:
        body["id"] = chunk_id
    return orjson.dumps(body).decode()


def result_of(raw: Frame, output: str) -> tuple[int, np.ndarray, dict[str, Any]]:
    """(step, first output, the JSON message or {}) of a result reply, text or binary."""
    if isinstance(raw, bytes):
        step, steps, width = REPLY_HEADER.unpack_from(raw)
        values = np.frombuffer(raw, "<f4", offset=REPLY_HEADER.size)
        assert values.size == steps * width
        return step, values.reshape(steps, width), {}
    message = orjson.loads(raw)
    assert message["type"] == "result", message
    return message["step"], np.asarray(message["outputs"][output], dtype=np.float32), message


def assert_problem(message: dict[str, Any], status: int, code: str) -> None:
    assert message["type"] == "error", message
    assert set(message) >= PROBLEM_FIELDS, message
    assert (message["status"], message["code"]) == (status, code), message
    assert message["problem_type"].endswith(code) and message["detail"], message


async def exported(http: httpx.AsyncClient, session_id: str) -> dict[str, np.ndarray]:
    response = await http.get(f"/v1/sessions/{session_id}/state")
    assert response.status_code == 200, response.text
    archive = np.load(io.BytesIO(response.content), allow_pickle=False)
    return {k: archive[k] for k in archive.files}


def assert_same_state(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> None:
    assert before.keys() == after.keys()
    for k in before:
        assert before[k].tobytes() == after[k].tobytes(), k


async def on_server_loop(server: LiveServer, coro: Coroutine[Any, Any, None]) -> None:
    loop = server.server.servers[0].get_loop()
    await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))


def split(array: np.ndarray, rng: np.random.Generator, max_chunks: int) -> list[np.ndarray]:
    total = array.shape[0]
    cuts = sorted(rng.choice(np.arange(1, total), size=min(total - 1, int(rng.integers(1, max_chunks))), replace=False))
    return np.split(array, cuts)


@pytest.fixture
async def http(api_server: LiveServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=api_server.url, timeout=TIMEOUT_S) as client:
        yield client


# -- streaming against the live server ----------------------------------------------------------------
async def stream_session(
    server: LiveServer, http: httpx.AsyncClient, model: RecurrentModel, served: str, seed: int
) -> None:
    """One session: random length, random chunking, JSON and binary frames mixed, all pipelined."""
    rng = np.random.default_rng(seed)
    name, output = model.contract.inputs[0].name, model.contract.outputs[0].name
    data = random_inputs(model.contract, int(rng.integers(4, 40)), rng)[name]
    pieces = split(data, rng, 8)
    binary = [bool(rng.integers(2)) for _ in pieces]
    if seed % 2:  # attach to a session that another connection created
        ws, hello = await open_stream(server, f"/v1/stream?model={served}")
        await ws.close()
        ws, hello = await open_stream(server, f"/v1/sessions/{hello['session_id']}/stream")
    else:
        ws, hello = await open_stream(server, f"/v1/stream?model={served}")
    assert (hello["type"], hello["model"], hello["step"]) == ("session", served, 0)

    async def send_all() -> None:
        for i, (piece, as_bytes) in enumerate(zip(pieces, binary, strict=True)):
            await ws.send(chunk_frame(name, piece, binary=as_bytes, chunk_id=f"c{i}"))

    sender = asyncio.create_task(send_all())
    outputs, step = [], 0
    for i, (piece, as_bytes) in enumerate(zip(pieces, binary, strict=True)):
        raw = await recv(ws)
        assert isinstance(raw, bytes) == as_bytes
        step_after, values, message = result_of(raw, output)
        step += len(piece)
        assert step_after == step and values.shape[0] == len(piece)
        assert as_bytes or (message["id"], message["replay"]) == (f"c{i}", False)
        outputs.append(values)
    await sender
    await ws.close()
    state = await exported(http, hello["session_id"])
    assert int(state["carryover_step"]) == len(data)
    assert_matches_offline(model, {name: data}, {output: np.concatenate(outputs)}, state)


async def test_many_pipelined_sessions_equal_the_offline_run(
    api_server: LiveServer, http: httpx.AsyncClient, loaded: dict[str, RecurrentModel]
) -> None:
    served = list(API_MODELS)
    await asyncio.gather(
        *(stream_session(api_server, http, loaded[API_MODELS[served[i % 3]]], served[i % 3], seed=i) for i in range(54))
    )


async def test_stream_creates_a_session_and_says_its_id(api_server: LiveServer, http: httpx.AsyncClient) -> None:
    ws, hello = await open_stream(api_server, "/v1/stream?model=tokens")
    assert hello["type"] == "session" and (hello["model"], hello["step"]) == ("tokens", 0)
    assert hello["expires_in"] > 0
    await ws.send(np.array([1, 2, 3], "<i4").tobytes())
    step, logits, _ = result_of(await recv(ws), "logits")
    assert step == 3 and logits.shape == (3, 11)
    await ws.close()
    info = (await http.get(f"/v1/sessions/{hello['session_id']}")).json()
    assert (info["model"], info["step"]) == ("tokens", 3)

    ws, hello = await open_stream(api_server, "/v1/stream")  # no model: the default
    assert hello["model"] == "gru" and hello["step"] == 0
    await ws.close()


async def test_replies_keep_chunk_order_under_pipelining(api_server: LiveServer) -> None:
    """More chunks than ``ws_max_in_flight``, sent without waiting, bad ones among them: one reply
    each, in order, errors in their place."""
    ws, _ = await open_stream(api_server, "/v1/stream?model=gru")
    rng = np.random.default_rng(3)
    lengths = [int(rng.integers(1, 5)) for _ in range(30)]
    bad = {4, 11, 12, 25}
    frames: list[Frame] = []
    for i, t in enumerate(lengths):
        x = rng.standard_normal((t, 4)).astype(np.float32)
        if i in bad:
            frames.append(orjson.dumps({"inputs": {"x": x[:, :3].tolist()}, "id": i}).decode())
        else:
            frames.append(chunk_frame("x", x, binary=i % 3 == 0, chunk_id=i))
    for frame in frames:
        await ws.send(frame)
    step = 0
    for i, t in enumerate(lengths):
        raw = await recv(ws)
        if i in bad:
            message = orjson.loads(raw)
            assert_problem(message, 422, "invalid_input")
            assert message["id"] == i
            continue
        step += t
        step_after, values, message = result_of(raw, "y")
        assert step_after == step and values.shape == (t, 3)
        assert i % 3 == 0 or message["id"] == i
    await ws.close()


async def test_attach_resumes_at_the_current_step(
    api_server: LiveServer, http: httpx.AsyncClient, loaded: dict[str, RecurrentModel]
) -> None:
    model = loaded[API_MODELS["lstm_step"]]
    x = np.random.default_rng(5).standard_normal((17, 4)).astype(np.float32)
    ws, hello = await open_stream(api_server, "/v1/stream?model=lstm_step")
    session_id = hello["session_id"]
    outputs = []
    for piece in (x[:5], x[5:9]):
        await ws.send(chunk_frame("x", piece, binary=False))
        outputs.append(result_of(await recv(ws), "y")[1])
    await ws.close()

    ws, hello = await open_stream(api_server, f"/v1/sessions/{session_id}/stream")
    assert (hello["session_id"], hello["model"], hello["step"]) == (session_id, "lstm_step", 9)
    await ws.send(chunk_frame("x", x[9:], binary=False, step=hello["step"]))  # exactly-once from here
    step, y, message = result_of(await recv(ws), "y")
    assert (step, message["replay"]) == (17, False)
    outputs.append(y)
    await ws.close()
    assert_matches_offline(model, {"x": x}, {"y": np.concatenate(outputs)}, await exported(http, session_id))


FEATURE_ERRORS: list[tuple[Frame, int, str]] = [
    ("{not json", 422, "invalid_input"),
    ("[1, 2]", 422, "invalid_input"),
    ('{"step": 0}', 422, "invalid_input"),
    ('{"inputs": 5}', 422, "invalid_input"),
    ('{"inputs": {"x": [[1, 2, 3, 4]]}, "extra": 1}', 422, "invalid_input"),
    ('{"inputs": {"nope": [[1, 2, 3, 4]]}}', 422, "invalid_input"),
    ('{"inputs": {"x": [[1, 2, 3]]}}', 422, "invalid_input"),
    ('{"inputs": {"x": [1, 2, 3, 4]}}', 422, "invalid_input"),
    ('{"inputs": {"x": [[1, 2], [3]]}}', 422, "invalid_input"),
    ('{"inputs": {"x": []}}', 422, "invalid_input"),
    ('{"inputs": {"x": [["a", "b", "c", "d"]]}}', 422, "invalid_input"),
    ('{"inputs": {"x": [[1e39, 0, 0, 0]]}}', 422, "invalid_input"),
    ('{"inputs": {"x": [[1, 2, 3, 4]]}, "step": -1}', 422, "invalid_input"),
    ('{"inputs": {"x": [[1, 2, 3, 4]]}, "step": true}', 422, "invalid_input"),
    ('{"inputs": {"x": [[1, 2, 3, 4]]}, "step": 999}', 409, "step_conflict"),
    (b"\0" * 15, 422, "invalid_input"),  # not a whole timestep of 4 float32
    (b"", 422, "invalid_input"),
    (np.array([[0, np.nan, 0, 0]], "<f4").tobytes(), 422, "invalid_input"),
    (np.zeros((1001, 4), "<f4").tobytes(), 422, "invalid_input"),  # over max_steps_per_request
]
TOKEN_ERRORS: list[tuple[Frame, int, str]] = [
    (np.array([1, 11], "<i4").tobytes(), 422, "invalid_input"),  # vocab of 11
    (np.array([-1], "<i4").tobytes(), 422, "invalid_input"),
    (b"\1\0\0\0\2\0", 422, "invalid_input"),
    ('{"inputs": {"tokens": [[1]]}}', 422, "invalid_input"),
    ('{"inputs": {"tokens": [1.5]}}', 422, "invalid_input"),
    ('{"inputs": {"tokens": [1, 2]}, "step": 0}', 409, "step_conflict"),
]


@pytest.mark.parametrize(
    ("served", "good", "errors"),
    [
        ("gru", '{"inputs": {"x": [[0.5, -1, 2, 0], [1, 1, 1, 1]]}}', FEATURE_ERRORS),
        ("tokens", '{"inputs": {"tokens": [4, 2]}}', TOKEN_ERRORS),
    ],
)
async def test_bad_messages_get_an_error_and_change_nothing(
    api_server: LiveServer, http: httpx.AsyncClient, served: str, good: str, errors: Sequence[tuple[Frame, int, str]]
) -> None:
    ws, hello = await open_stream(api_server, f"/v1/stream?model={served}")
    session_id = hello["session_id"]
    await ws.send(good)
    assert (await recv_json(ws))["step"] == 2
    before = await exported(http, session_id)
    for frame, status, code in errors:
        await ws.send(frame)
        message = await recv_json(ws)
        assert_problem(message, status, code)
        if code == "step_conflict":
            assert message["current_step"] == 2
        assert_same_state(before, await exported(http, session_id))
    await ws.send(orjson.dumps({"id": "tagged", "inputs": 5}).decode())
    assert (await recv_json(ws))["id"] == "tagged"  # errors echo the chunk's id
    await ws.send(good)  # the connection and the session still work
    assert (await recv_json(ws))["step"] == 4
    await ws.close()


async def test_a_replayed_chunk_answers_the_stored_outputs(api_server: LiveServer, http: httpx.AsyncClient) -> None:
    ws, hello = await open_stream(api_server, "/v1/stream?model=gru")
    body = {"inputs": {"x": [[0.1, 0.2, 0.3, 0.4], [1, 0, 0, 1]]}, "step": 0}
    await ws.send(orjson.dumps(body).decode())
    first = await recv_json(ws)
    state = await exported(http, hello["session_id"])
    await ws.send(orjson.dumps(body).decode())  # the client lost the reply and sends it again
    again = await recv_json(ws)
    assert (first["step"], first["replay"], again["step"], again["replay"]) == (2, False, 2, True)
    assert again["outputs"] == first["outputs"]
    assert_same_state(state, await exported(http, hello["session_id"]))
    await ws.close()


@pytest.mark.parametrize("kind", ["text", "binary"])
async def test_a_message_over_the_limit_closes_1009(api_server: LiveServer, http: httpx.AsyncClient, kind: str) -> None:
    ws, hello = await open_stream(api_server, "/v1/stream?model=gru")
    big: Frame = b"\0" * (256 * 1024 + 16) if kind == "binary" else " " * (256 * 1024 + 1)
    await ws.send(chunk_frame("x", np.ones((3, 4), np.float32), binary=False))
    await ws.send(big)
    assert (await recv_json(ws))["step"] == 3  # the chunk before it is still answered
    assert_problem(await recv_json(ws), 413, "payload_too_large")
    assert await close_code(ws) == 1009
    assert int((await exported(http, hello["session_id"]))["carryover_step"]) == 3


async def test_unknown_session_or_model_is_an_error_then_close_4404(api_server: LiveServer) -> None:
    ws, message = await open_stream(api_server, "/v1/sessions/no-such-session/stream")
    assert_problem(message, 404, "session_not_found")
    assert await close_code(ws) == 4404
    ws, message = await open_stream(api_server, "/v1/stream?model=nope")
    assert_problem(message, 404, "model_not_found")
    assert await close_code(ws) == 4404


async def test_a_deleted_session_ends_its_stream_with_4404(api_server: LiveServer, http: httpx.AsyncClient) -> None:
    ws, hello = await open_stream(api_server, "/v1/stream?model=gru")
    assert (await http.delete(f"/v1/sessions/{hello['session_id']}")).status_code == 204
    await ws.send(chunk_frame("x", np.ones((1, 4), np.float32), binary=True))
    assert_problem(await recv_json(ws), 404, "session_not_found")
    assert await close_code(ws) == 4404


async def websocket_gauge(http: httpx.AsyncClient, want: float) -> None:
    """Wait until /metrics counts ``want`` open WebSockets (a handler ends just after its close)."""
    deadline = asyncio.get_running_loop().time() + TIMEOUT_S
    while True:
        text = (await http.get("/metrics")).text
        values = [float(line.split()[1]) for line in text.splitlines() if line.startswith("carryover_websocket_conn")]
        if values == [want]:
            return
        assert asyncio.get_running_loop().time() < deadline, f"websocket gauge {values}, want {want}"
        await asyncio.sleep(0.02)


async def test_open_connections_are_counted(api_server: LiveServer, http: httpx.AsyncClient) -> None:
    await websocket_gauge(http, 0)
    first, _ = await open_stream(api_server, "/v1/stream")
    second, _ = await open_stream(api_server, "/v1/sessions/no-such-session/stream")  # closes itself
    await websocket_gauge(http, 1)
    await first.close()
    await second.close()
    await websocket_gauge(http, 0)


# -- shutdown and outages ----------------------------------------------------------------------------
async def test_shutdown_answers_in_flight_chunks_then_closes_1012(
    redis_server: RedisServer, loaded: dict[str, RecurrentModel]
) -> None:
    with live_server(redis_server.url, {"gru": loaded["gru_stacked"]}) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT_S) as http:
            # close_streams (the app drain's second half): what was read is answered, in order, then 1012.
            ws, hello = await open_stream(server, "/v1/stream")
            for _ in range(6):
                await ws.send(chunk_frame("x", np.ones((2, 4), np.float32), binary=False))
            steps = [(await recv_json(ws))["step"]]
            await on_server_loop(server, app_state(server.app).close_streams())
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    steps.append((await recv_json(ws))["step"])
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
            assert steps == list(range(2, 2 * len(steps) + 1, 2))
            info = (await http.get(f"/v1/sessions/{hello['session_id']}")).json()
            assert info["step"] == steps[-1]  # every applied chunk was answered

        # Stopping the server (SIGTERM): open connections, idle or busy, are closed with 1012.
        idle, _ = await open_stream(server, "/v1/stream")
        busy, _ = await open_stream(server, "/v1/stream")
        await busy.send(chunk_frame("x", np.ones((2, 4), np.float32), binary=True))
        await recv(busy)
        for _ in range(4):
            await busy.send(chunk_frame("x", np.ones((2, 4), np.float32), binary=True))
        await asyncio.to_thread(server.stop)
        assert await close_code(idle) == 1012
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                assert isinstance(await recv(busy), bytes)  # replies that made it, then the close
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012


async def test_overload_and_redis_outage_close_1013_never_1011(
    tmp_path: Path, loaded: dict[str, RecurrentModel]
) -> None:
    redis = RedisServer(tmp_path / "redis", appendonly=True)
    redis.start()
    try:
        with live_server(redis.url, {"gru": loaded["gru_stacked"]}, max_queue=1, redis_timeout_s=1.0) as server:
            # Queue full: pipelined chunks overflow a queue of one. The error, the replies of the
            # chunks already read, then 1013; the session holds exactly what was answered.
            ws, hello = await open_stream(server, "/v1/stream")
            x = np.ones((1, 4), np.float32)
            await ws.send(chunk_frame("x", x, binary=False))
            await recv(ws)
            for _ in range(8):
                await ws.send(chunk_frame("x", x, binary=False))
            messages = []
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    messages.append(await recv_json(ws))
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
            codes = [m.get("code") for m in messages]
            assert "overloaded" in codes
            overloaded = messages[codes.index("overloaded")]
            assert_problem(overloaded, 503, "overloaded")
            assert overloaded["retry_after"] > 0
            last_step = max([1] + [m["step"] for m in messages if m["type"] == "result"])
            async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT_S) as http:
                info = (await http.get(f"/v1/sessions/{hello['session_id']}")).json()
            assert info["step"] == last_step

            # Redis down: a chunk gets the error, then 1013; so does a new connection.
            ws, hello = await open_stream(server, f"/v1/sessions/{hello['session_id']}/stream")
            redis.stop(kill=True)
            await ws.send(chunk_frame("x", x, binary=True))
            assert_problem(await recv_json(ws), 503, "store_unavailable")
            assert await close_code(ws) == 1013
            ws, message = await open_stream(server, f"/v1/sessions/{hello['session_id']}/stream")
            assert_problem(message, 503, "store_unavailable")
            assert await close_code(ws) == 1013

            redis.start()  # back (with its AOF): the session resumes where it was
            ws, again = await open_stream(server, f"/v1/sessions/{hello['session_id']}/stream")
            assert again["step"] == last_step
            await ws.send(chunk_frame("x", x, binary=True))
            assert result_of(await recv(ws), "y")[0] == last_step + 1
            await ws.close()
    finally:
        redis.stop(kill=True)
