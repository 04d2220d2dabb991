"""Server-sent events of a generation (``POST /v1/sessions/{id}/generate``; docs/generation.md).

Translates a ``GenerationStream`` into SSE with sse-starlette: one unnamed event per token
``data: {"token": id, "text": "c", "step": n}``, then ``event: done`` with
``data: {"step", "tokens", "text", "finish_reason"}``. An error after the first token ends the
stream with ``event: error`` and the problem fields as data; errors before it (unknown session,
409 on ``step``, bad input) are ordinary problem+json replies, since the route waits for the first
event before it answers. A client that goes away cancels the generation at the next token
boundary (everything streamed was applied).
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from typing import Any

import orjson
from sse_starlette import EventSourceResponse, ServerSentEvent

from service.api.problems import error_problem
from service.errors import CarryoverError
from service.sessions import MAX_STOP_CHARS, MAX_STOP_STRINGS, DoneEvent, GenerationStream, TokenEvent

EVENT_STREAM = "text/event-stream"
PING_S = 15  # a comment line now and then keeps proxies from closing a slow stream

GENERATE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "prompt": {
            "description": "text (one character per token; outside the vocab: unk_id) or token ids; empty: "
            "continue from the session's last prediction",
            "oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "integer", "minimum": 0}}],
        },
        "max_tokens": {"type": "integer", "minimum": 1, "default": 64},
        "temperature": {"type": "number", "minimum": 0, "default": 1.0, "description": "0 = greedy"},
        "top_k": {"type": "integer", "minimum": 0, "default": 0, "description": "0 = no top-k cut"},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 1.0},
        "seed": {
            "type": "integer",
            "minimum": 0,
            "maximum": 2**64 - 1,
            "description": "same seed and state: same tokens",
        },
        "stop": {
            "description": "stop after the token that completes one of these strings (it is kept)",
            "oneOf": [
                {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS},
                {
                    "type": "array",
                    "maxItems": MAX_STOP_STRINGS,
                    "items": {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS},
                },
            ],
        },
        "step": {"type": "integer", "minimum": 0, "description": "the step the session must be at (else 409)"},
    },
}


def generate_schema(vocab_size: int, max_prompt: int, max_tokens: int) -> dict[str, Any]:
    """``GENERATE_SCHEMA`` with the served limits: prompt ids in [0, vocab), prompt length and
    ``max_tokens`` within the settings (built with the OpenAPI document, after start-up)."""
    schema = copy.deepcopy(GENERATE_SCHEMA)
    text, ids = schema["properties"]["prompt"]["oneOf"]
    text["maxLength"] = max_prompt
    ids.update(maxItems=max_prompt, items={"type": "integer", "minimum": 0, "maximum": vocab_size - 1})
    schema["properties"]["max_tokens"]["maximum"] = max_tokens
    return schema


GENERATE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": GENERATE_SCHEMA,
                "example": {"prompt": "def main():\n", "max_tokens": 40, "temperature": 0.8, "seed": 1},
            }
        },
    }
}
SSE_EVENT: dict[str, Any] = {
    "type": "object",
    "properties": {
        "event": {"type": "string", "enum": ["message", "done", "error"]},
        "data": {"type": "string", "description": "a JSON object"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
    "required": ["data"],
}
GENERATE_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": 'one `data: {"token", "text", "step"}` event per token, then `event: done` with '
        '`data: {"step", "tokens", "text", "finish_reason"}` (or `event: error` with a problem)',
        # OpenAPI 3.2's form: itemSchema is one event; schema, the whole stream as a list of events.
        "content": {EVENT_STREAM: {"schema": {"type": "array", "items": SSE_EVENT}, "itemSchema": SSE_EVENT}},
    }
}


def token_data(event: TokenEvent) -> dict[str, Any]:
    return {"token": event.token, "text": event.text, "step": event.step}


def done_data(event: DoneEvent) -> dict[str, Any]:
    return {"step": event.step, "tokens": list(event.tokens), "text": event.text, "finish_reason": event.finish_reason}


async def sse_response(stream: GenerationStream) -> EventSourceResponse:
    """Wait for the generation's first event (raising what fails before it), then stream."""
    try:
        first = await anext(stream)
    except BaseException:
        stream.cancel()
        raise
    return EventSourceResponse(_events(stream, first), ping=PING_S)


async def _events(stream: GenerationStream, first: TokenEvent | DoneEvent) -> AsyncIterator[ServerSentEvent]:
    try:
        event: TokenEvent | DoneEvent | None = first
        while event is not None:
            if isinstance(event, DoneEvent):
                yield ServerSentEvent(orjson.dumps(done_data(event)).decode(), event="done")
                return
            yield ServerSentEvent(orjson.dumps(token_data(event)).decode())
            event = await anext(stream, None)
    except CarryoverError as e:
        yield ServerSentEvent(orjson.dumps(error_problem(e)).decode(), event="error")
    finally:
        stream.cancel()  # the client went away (or the stream ended): stop at the next boundary
