"""The WebSocket message protocol, sans-IO: frames in, typed chunks out; replies back to frames.
Pure functions, no socket (the connection loop is ``ws.py``; the protocol is docs/websocket.md)."""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from service.errors import InvalidInput
from service.sessions import (
    DoneEvent,
    GenerateCall,
    ModelContract,
    SessionInfo,
    StepCall,
    StepReply,
    TokenEvent,
    parse_generate,
    parse_step,
)

REPLY_HEADER = struct.Struct("<qII")  # step, T, O: the header of a binary reply
CHUNK_ID = "id"  # the one field of a text chunk that is the WebSocket's own, not the step's
MESSAGE_TYPE = "type"  # absent: a step chunk; "generate" / "cancel": a generation's messages


@dataclass(frozen=True)
class Chunk:
    """One client message: the step it asks for, the ``id`` to echo, and how to answer it."""

    call: StepCall
    id: Any = None
    binary: bool = False


def read_text(text: str) -> tuple[dict[str, Any], Any]:
    """A text message → (its JSON object, its ``id``); ``InvalidInput`` before the id is known."""
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError as e:
        raise InvalidInput(f"the message is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise InvalidInput('a text message must be a JSON object: {"inputs": {...}, "step": n?, "id": ...?}')
    chunk_id = data.get(CHUNK_ID)
    if isinstance(chunk_id, dict | list):
        raise InvalidInput("'id' must be a string, number or boolean")
    return data, chunk_id


def text_chunk(data: dict[str, Any], chunk_id: Any) -> Chunk:
    """The chunk of a text message's object: the step envelope, parsed by ``parse_step``. Shapes
    are checked later, against the model, by ``SessionService``."""
    return Chunk(parse_step(data, transport_fields=frozenset({CHUNK_ID})), chunk_id)


def generate_call(data: dict[str, Any]) -> GenerateCall:
    """The generation of a ``{"type": "generate", "prompt": ..., "id": ...?}`` message."""
    return parse_generate(data, transport_fields=frozenset({CHUNK_ID, MESSAGE_TYPE}))


def token_message(event: TokenEvent, chunk_id: Any) -> str:
    """One generated token, as the generate message's reply stream sends it."""
    message = {"type": "token", "token": event.token, "text": event.text, "step": event.step}
    return _with_id(message, chunk_id)


def done_message(event: DoneEvent, chunk_id: Any) -> str:
    """The end of a generation; ``logits`` (the prediction after the last token) when it ran."""
    message: dict[str, Any] = {
        "type": "done",
        "step": event.step,
        "tokens": list(event.tokens),
        "text": event.text,
        "finish_reason": event.finish_reason,
    }
    if event.logits is not None:
        message["logits"] = np.ascontiguousarray(event.logits, dtype=np.float32)
    return _with_id(message, chunk_id)


def _with_id(message: dict[str, Any], chunk_id: Any) -> str:
    if chunk_id is not None:
        message["id"] = chunk_id
    return orjson.dumps(message, option=orjson.OPT_SERIALIZE_NUMPY).decode()


def parse_text(text: str) -> Chunk:
    """A text chunk: ``{"inputs": {...}, "step": n?, "id": ...?}``."""
    return text_chunk(*read_text(text))


def decode_binary(contract: ModelContract, data: bytes) -> Chunk:
    """A binary chunk: little-endian float32 ``[T, F]`` for a float input, int32 ids for tokens."""
    if len(contract.inputs) != 1:
        names = [t.name for t in contract.inputs]
        raise InvalidInput(f"binary frames need a model with one input; this model takes {names}: send JSON")
    t = contract.inputs[0]
    wire: np.dtype[Any]
    if t.dtype.kind in "iu":
        wire, what = np.dtype("<i4"), "int32 token id"
    elif t.dtype.kind == "f":
        wire, what = np.dtype("<f4"), "float32 value"
    else:
        raise InvalidInput(f"input {t.name!r} is {t.dtype.name}; binary frames carry float32 or int32: send JSON")
    per_step = math.prod(t.shape)
    frame = per_step * wire.itemsize
    if not data:
        raise InvalidInput("the binary frame is empty: a chunk needs at least one timestep (T >= 1)")
    if len(data) % frame:
        raise InvalidInput(
            f"the binary frame has {len(data)} bytes, not a whole number of timesteps: one timestep of "
            f"{t.name!r} is {per_step} {what}{'s' if per_step > 1 else ''} ({frame} bytes)"
        )
    array = np.frombuffer(data, dtype=wire).reshape(-1, *t.shape)
    if wire.kind == "i":
        array = array.astype(np.int64)
    return Chunk(StepCall({t.name: array}), binary=True)


def encode_result(chunk: Chunk, reply: StepReply, contract: ModelContract) -> str | bytes:
    """The reply to a chunk: text JSON for a text chunk, header + float32 for a binary one."""
    if chunk.binary:
        first = np.ascontiguousarray(reply.outputs[contract.outputs[0].name], dtype="<f4")
        steps = first.shape[0]
        width = math.prod(first.shape[1:])
        return REPLY_HEADER.pack(reply.step, steps, width) + first.tobytes()
    message: dict[str, Any] = {
        "type": "result",
        "step": reply.step,
        "outputs": {k: np.ascontiguousarray(v) for k, v in reply.outputs.items()},
        "replay": reply.replay,
    }
    if chunk.id is not None:
        message["id"] = chunk.id
    return orjson.dumps(message, option=orjson.OPT_SERIALIZE_NUMPY).decode()


def session_message(info: SessionInfo) -> str:
    """The first server message: which session this connection streams through, and its step."""
    return orjson.dumps(
        {
            "type": "session",
            "session_id": info.session_id,
            "model": info.model,
            "step": info.step,
            "expires_in": info.expires_in,
        }
    ).decode()


def message_size(message: Mapping[str, Any]) -> int:
    """Bytes of an ASGI ``websocket.receive`` message (text as UTF-8), for the size limit."""
    text = message.get("text")
    if text is not None:
        return len(text) if text.isascii() else len(text.encode())
    return len(message.get("bytes") or b"")
