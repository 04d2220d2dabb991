"""The WebSocket message protocol without a server: text and binary chunks in, replies out."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from service.api.ws_protocol import (
    Chunk,
    decode_binary,
    encode_result,
    message_size,
    parse_text,
    read_text,
    session_message,
    text_chunk,
)
from service.engine.contract import DataTensor, ModelContract
from service.errors import InvalidInput
from service.sessions import SessionInfo, StepCall, StepReply


def contract(*inputs: DataTensor) -> ModelContract:
    y = DataTensor("y", np.dtype(np.float32), (2, 3))
    return ModelContract(form="sequence", kind="features", inputs=inputs, outputs=(y,), states=())


def test_binary_frames_decode_float32_rows_and_int32_tokens() -> None:
    features = contract(DataTensor("x", np.dtype(np.float32), (2, 2)))
    rows = np.arange(12, dtype="<f4")
    chunk = decode_binary(features, rows.tobytes())
    assert chunk.binary and chunk.call.inputs["x"].shape == (3, 2, 2)
    np.testing.assert_array_equal(chunk.call.inputs["x"].ravel(), rows)

    tokens = contract(DataTensor("tokens", np.dtype(np.int64), ()))
    ids = decode_binary(tokens, np.array([3, 0, 7], "<i4").tobytes()).call.inputs["tokens"]
    assert ids.dtype == np.int64 and ids.tolist() == [3, 0, 7]

    with pytest.raises(InvalidInput, match="not a whole number of timesteps"):
        decode_binary(features, b"\0" * 20)
    with pytest.raises(InvalidInput, match="empty"):
        decode_binary(features, b"")


def test_binary_frames_need_a_single_input_model() -> None:
    """The served test models all have one input, so this path is checked on a contract alone: a
    two-input model over the wire would need an extra ONNX export only for this error message."""
    two = contract(DataTensor("x", np.dtype(np.float32), (4,)), DataTensor("z", np.dtype(np.float32), (1,)))
    with pytest.raises(InvalidInput, match=r"one input; this model takes \['x', 'z'\]: send JSON"):
        decode_binary(two, np.zeros(5, "<f4").tobytes())


def test_binary_reply_is_a_step_header_then_float32() -> None:
    features = contract(DataTensor("x", np.dtype(np.float32), (4,)))
    y = np.arange(12, dtype=np.float32).reshape(2, 2, 3)
    frame = encode_result(Chunk(StepCall({}), binary=True), StepReply("s", 7, {"y": y}), features)
    assert isinstance(frame, bytes)
    assert struct.unpack_from("<qII", frame) == (7, 2, 6) and len(frame) == 16 + 12 * 4
    np.testing.assert_array_equal(np.frombuffer(frame, "<f4", offset=16), y.ravel())
    text = encode_result(Chunk(StepCall({}), id="a"), StepReply("s", 7, {"y": y}), features)
    assert isinstance(text, str)
    assert json.loads(text) == {"type": "result", "step": 7, "outputs": {"y": y.tolist()}, "replay": False, "id": "a"}


def test_text_envelope_is_checked_before_the_model() -> None:
    assert parse_text('{"inputs": {"x": [[1]]}, "step": 3, "id": 9}') == Chunk(StepCall({"x": [[1]]}, 3), 9)
    for bad in ("{", "[]", '{"step": 1}', '{"inputs": {}, "step": true}', '{"inputs": {}, "id": [1]}'):
        with pytest.raises(InvalidInput):
            parse_text(bad)


def test_an_invalid_text_chunk_still_yields_its_id_for_the_error() -> None:
    data, chunk_id = read_text('{"id": "tagged", "inputs": 5}')
    assert chunk_id == "tagged"
    with pytest.raises(InvalidInput, match="'inputs'"):
        text_chunk(data, chunk_id)
    with pytest.raises(InvalidInput, match="unknown field"):
        parse_text('{"inputs": {"x": [[1]]}, "steps": 1}')


def test_session_message_and_sizes() -> None:
    info = SessionInfo("s1", "gru", "f" * 64, 42, 60.0, 1.0, 2.0)
    assert json.loads(session_message(info)) == {
        "type": "session",
        "session_id": "s1",
        "model": "gru",
        "step": 42,
        "expires_in": 60.0,
    }
    assert message_size({"text": "ab"}) == 2 and message_size({"text": "é"}) == 2
    assert message_size({"bytes": b"abc"}) == 3 and message_size({"bytes": None}) == 0
