"""The bad-input matrix: every kind of bad step body (HTTP), WebSocket message (JSON and binary
frames) and state upload gets a 4xx problem (or a WebSocket error message, and a close code where
the kind ends the connection) whose detail names what is wrong, and leaves the session's raw
Redis hash byte-identical."""

from __future__ import annotations

import io
import zipfile
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import numpy as np
import orjson
import pytest

from service.engine.model import RecurrentModel
from service.store.record import session_key
from tests.live_server import API_MODELS, LiveServer
from tests.redis_fixture import RedisServer
from tests.service.api.test_http import BAD_STEPS, Bad, assert_problem, create, js, state_file, step
from tests.service.api.test_ws import close_code, open_stream, recv_json

X1 = [[0.5, -1.0, 0.25, 2.0]]
BAD_STEPS_MORE = {
    "deeply_nested": Bad("gru", b'{"inputs": {"x": ' + b"[" * 5000 + b"]" * 5000 + b"}}", 400, "invalid_json", ()),
    "number_over_double": Bad("gru", b'{"inputs": {"x": [[1, 2, 3, 1e400]]}}', 400, "invalid_json", ("infinity",)),
    "null_values": Bad("gru", js({"inputs": {"x": [[None, 1, 2, 3]]}}), 422, "invalid_input", ("'x'",)),
    "nested_objects": Bad("gru", js({"inputs": {"x": [{"a": 1}]}}), 422, "invalid_input", ("'x'",)),
    "string_step": Bad("gru", js({"inputs": {"x": X1}, "step": "3"}), 422, "invalid_input", ("'step'",)),
    "float_step": Bad("gru", js({"inputs": {"x": X1}, "step": 1.5}), 422, "invalid_input", ("'step'",)),
    "stale_step": Bad("gru", js({"inputs": {"x": X1}, "step": 1}), 409, "step_conflict", ("3",)),
    "not_utf8": Bad("gru", b'{"inputs": {"x": "\xff\xfe"}}', 400, "invalid_json", ()),
    "scalar_input": Bad("gru", js({"inputs": {"x": 3.0}}), 422, "invalid_input", ("'x'",)),
    "token_lm_given_floats_name": Bad("tokens", js({"inputs": {"x": X1}}), 422, "invalid_input", ("'x'", "tokens")),
}
STEPS = {**BAD_STEPS, **BAD_STEPS_MORE}


@dataclass(frozen=True)
class BadFrame:
    model: str
    frame: str | bytes
    status: int
    code: str
    words: tuple[str, ...] = ()
    close: int | None = None  # the close code, for the kinds that end the connection


def text(value: object) -> str:
    return orjson.dumps(value).decode()


BAD_FRAMES = {
    "not_json": BadFrame("gru", '{"inputs": ', 422, "invalid_input", ("not valid JSON",)),
    "json_array": BadFrame("gru", text([1, 2]), 422, "invalid_input", ("JSON object",)),
    "no_inputs": BadFrame("gru", text({"id": 1}), 422, "invalid_input", ("'inputs'",)),
    "unknown_field": BadFrame("gru", text({"inputs": {"x": X1}, "stp": 1}), 422, "invalid_input", ("'stp'",)),
    "object_id": BadFrame("gru", text({"inputs": {"x": X1}, "id": {"a": 1}}), 422, "invalid_input", ("'id'",)),
    "wrong_shape": BadFrame("gru", text({"inputs": {"x": [[1, 2]]}}), 422, "invalid_input", ("'x'", "[T, 4]")),
    "nan_literal": BadFrame("gru", '{"inputs": {"x": [[NaN, 0, 0, 0]]}}', 422, "invalid_input", ("JSON",)),
    "stale_step": BadFrame("gru", text({"inputs": {"x": X1}, "step": 0}), 409, "step_conflict", ("3",)),
    "token_out_of_range": BadFrame("tokens", text({"inputs": {"tokens": [99]}}), 422, "invalid_input", ("99",)),
    "empty_binary": BadFrame("gru", b"", 422, "invalid_input", ("empty",)),
    "partial_timestep": BadFrame("gru", b"\0" * 10, 422, "invalid_input", ("10 bytes", "16 bytes")),
    "nan_binary": BadFrame("gru", np.full((1, 4), np.nan, "<f4").tobytes(), 422, "invalid_input", ("NaN",)),
    "binary_token_out_of_range": BadFrame(
        "tokens", np.array([3, 11], "<i4").tobytes(), 422, "invalid_input", ("11", "[0, 11)")
    ),
    "over_message_limit": BadFrame("gru", " " * (256 * 1024 + 1), 413, "payload_too_large", ("limit",), close=1009),
}


def zipped(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buffer.getvalue()


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


H0 = np.full((2, 8), 0.5, np.float32)  # the token model's one state tensor
BAD_UPLOADS: dict[str, tuple[bytes, int, str, tuple[str, ...]]] = {
    "garbage": (b"this is not an npz archive", 422, "invalid_input", ("must be an .npz", "'h0'", "not a zip")),
    "a_pickle": (b"\x80\x04\x95" + b"\0" * 40, 422, "invalid_input", ("must be an .npz", "not a zip")),
    "object_array": (zipped({"h0.npy": npy(np.array([{"a": 1}], dtype=object))}), 422, "invalid_input", ("objects",)),
    "non_npy_member": (zipped({"h0": b"raw bytes"}), 422, "invalid_input", ("'h0'", "not .npy")),
    "bad_npy_header": (zipped({"h0.npy": b"\x93NUMPY garbage"}), 422, "invalid_input", ("must be an .npz",)),
    "zip_bomb": (
        zipped({"h0.npy": npy(np.zeros(8 * 1024 * 1024, np.float32))}),
        422,
        "invalid_input",
        ("unpacks to",),
    ),
    "wrong_shape": (state_file(h0=np.zeros((2, 7), np.float32)), 422, "invalid_input", ("'h0'", "shape")),
    "wrong_dtype": (state_file(h0=H0.astype(np.float64)), 422, "invalid_input", ("'h0'", "float64")),
    "nan_state": (state_file(h0=np.full((2, 8), np.nan, np.float32)), 422, "invalid_input", ("NaN",)),
    "unknown_tensor": (state_file(h0=H0, c0=H0), 422, "invalid_input", ("'c0'",)),
    "missing_tensor": (state_file(carryover_step=np.int64(1)), 422, "invalid_input", ("'h0'", "missing")),
    "negative_step": (state_file(h0=H0, carryover_step=np.int64(-3)), 422, "invalid_input", ("carryover_step",)),
    "foreign_fingerprint": (
        state_file(h0=H0, carryover_fingerprint=np.str_("0" * 64)),
        409,
        "model_mismatch",
        ("fingerprint",),
    ),
    "empty": (b"", 422, "invalid_input", ("empty",)),
}


@pytest.fixture
async def client(api_server: LiveServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=api_server.url, timeout=30) as c:
        yield c


def raw_hash(redis_server: RedisServer, sid: str) -> dict[bytes, bytes]:
    with redis_server.client() as r:
        value = r.hgetall(session_key(sid))
    assert value, f"no record for {sid}"
    return dict(value)


async def stepped_session(client: httpx.AsyncClient, loaded: dict[str, RecurrentModel], model: str) -> str:
    """A session three steps in (a state that is not the initial one)."""
    sid = await create(client, model=model)
    contract = loaded[API_MODELS[model]].contract
    good = {t.name: np.ones((3, *t.shape), t.dtype) for t in contract.inputs}
    assert (await step(client, sid, good)).status_code == 200
    return sid


def test_the_matrix_has_at_least_20_kinds_per_transport() -> None:
    assert len(STEPS) >= 20 and len(BAD_FRAMES) >= 12 and len(BAD_UPLOADS) >= 12
    assert len(STEPS) + len(BAD_FRAMES) + len(BAD_UPLOADS) >= 60


@pytest.mark.parametrize("case", STEPS.values(), ids=STEPS.keys())
async def test_bad_step_over_http(
    client: httpx.AsyncClient, loaded: dict[str, RecurrentModel], redis_server: RedisServer, case: Bad
) -> None:
    sid = await stepped_session(client, loaded, case.model)
    before = raw_hash(redis_server, sid)
    r = await client.post(f"/v1/sessions/{sid}/step", content=case.body, headers=case.headers)
    assert_problem(r, case.status, case.code, *case.words)
    assert raw_hash(redis_server, sid) == before


@pytest.mark.parametrize("case", BAD_FRAMES.values(), ids=BAD_FRAMES.keys())
async def test_bad_websocket_message(
    api_server: LiveServer,
    client: httpx.AsyncClient,
    loaded: dict[str, RecurrentModel],
    redis_server: RedisServer,
    case: BadFrame,
) -> None:
    sid = await stepped_session(client, loaded, case.model)
    before = raw_hash(redis_server, sid)
    ws, hello = await open_stream(api_server, f"/v1/sessions/{sid}/stream")
    assert hello["step"] == 3
    await ws.send(case.frame)
    message = await recv_json(ws)
    assert message["type"] == "error" and (message["status"], message["code"]) == (case.status, case.code), message
    for word in case.words:
        assert word in message["detail"], (word, message["detail"])
    if case.close is not None:
        assert await close_code(ws) == case.close
    else:
        contract = loaded[API_MODELS[case.model]].contract
        good = {"inputs": {t.name: np.ones((1, *t.shape), t.dtype).tolist() for t in contract.inputs}}
        assert raw_hash(redis_server, sid) == before
        await ws.send(text(good))
        assert (await recv_json(ws))["step"] == 4  # the connection goes on
        await ws.close()
        return
    assert raw_hash(redis_server, sid) == before


@pytest.mark.parametrize("kind", BAD_UPLOADS.keys())
async def test_bad_state_upload(
    client: httpx.AsyncClient, loaded: dict[str, RecurrentModel], redis_server: RedisServer, kind: str
) -> None:
    body, status, code, words = BAD_UPLOADS[kind]
    sid = await stepped_session(client, loaded, "tokens")
    before = raw_hash(redis_server, sid)
    binary = {"content-type": "application/octet-stream"}
    r = await client.put(f"/v1/sessions/{sid}/state", content=body, headers=binary)
    assert_problem(r, status, code, *words)
    assert raw_hash(redis_server, sid) == before
