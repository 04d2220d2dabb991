"""The OpenAPI-only side of the HTTP API: pydantic models of every body (``CreateSessionRequest``
is also what FastAPI parses a create body with; the step body is parsed by
``service.sessions.parse_step`` and only *documented* by ``StepRequest``), and the response
documentation the routes declare."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import numpy as np
from fastapi import Path
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from service.api.problems import PROBLEM_MEDIA_TYPE
from service.sessions import MAX_TTL_S, SESSION_ID, ModelContract, integral

JSON_MEDIA_TYPE = "application/json"
NPZ_MEDIA_TYPE = "application/x-npz"
BINARY_MEDIA_TYPE = "application/octet-stream"
FLOAT_BOUND = {"float16": 65_000.0, "float32": 3.4e38}  # finite after the cast to the input's dtype


class TensorInfo(BaseModel):
    name: str
    dtype: str = Field(examples=["float32"])
    shape: list[int | str] = Field(
        description="shape of one request's tensor; the leading 'T' is its number of timesteps", examples=[["T", 4]]
    )


class StateInfo(BaseModel):
    input: str = Field(description="the graph input that takes this state")
    output: str = Field(description="the graph output that returns it")
    dtype: str
    shape: list[int] = Field(description="one session's slice (batch axis removed)")
    batch_axis: int


class ConstantInfo(BaseModel):
    name: str = Field(description="the graph input that takes this per-session constant")
    dtype: str
    shape: list[int | str] = Field(description="one session's value (batch axis removed); 'L' is its length")
    batch_axis: int
    length_axis: int | None = Field(description="graph axis padded per batch (null: fixed shape)")
    mask: str | None = Field(description="the [B, L] graph input marking a batch's real positions")


class ModelInfo(BaseModel):
    name: str
    fingerprint: str = Field(description="sha256 of the model bytes, lowercase hex")
    kind: Literal["features", "token_lm"]
    form: Literal["sequence", "step"]
    provider: str = Field(description="ONNX Runtime execution provider in use")
    default: bool = Field(description="used when a new session names no model")
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    states: list[StateInfo]
    constants: list[ConstantInfo] | None = Field(
        None, description="per-session constants, given when a session is created (e.g. encoder outputs)"
    )
    vocab: str | list[str] | None = Field(None, description="token LMs: the tokens (index = id)")
    unk_id: int | None = Field(None, description="token LMs: the id that text outside the vocab maps to")


class ModelsResponse(BaseModel):
    models: list[ModelInfo]


class CreateSessionRequest(BaseModel):
    """The body of ``POST /v1/sessions``. ``session_id`` and ``ttl_s`` state the rules of
    ``service.sessions`` (imported from there), so that a 422 names the field in ``errors``."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="served model name; default: the first served model")
    session_id: str | None = Field(
        None,
        pattern=SESSION_ID.pattern,
        description="client-chosen id (1-128 of A-Z a-z 0-9 . _ ~ -); default: 128 random bits, URL-safe",
    )
    ttl_s: Annotated[int, Field(ge=1, le=MAX_TTL_S, strict=True), BeforeValidator(integral)] | None = Field(
        None,
        description="seconds without access before the session expires; default: the server's session_ttl_s",
    )
    fork_from: str | None = Field(None, description="start from a copy of this session's state and step")
    constants: dict[str, list[Any]] | None = Field(
        None,
        description="models with per-session constants (see the model's 'constants'): one session's value of "
        "each, batch axis removed, e.g. an attention decoder's encoder outputs {'memory': [[...], ...]} as [L, D]",
    )


class SessionCreated(BaseModel):
    session_id: str
    model: str
    fingerprint: str = Field(description="fingerprint of the model whose state the session holds")
    step: int = Field(description="timesteps consumed so far")
    expires_in: float = Field(description="seconds until the session expires (refreshed on every access)")

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "session_id": "q3Zr0m6xH3kAqj9Q7yW1nA",
                    "model": "charlm",
                    "fingerprint": "9f2c…",
                    "step": 0,
                    "expires_in": 86400.0,
                }
            ]
        }
    )


class SessionMetadata(SessionCreated):
    created_at: float = Field(description="Unix time (seconds)")
    updated_at: float = Field(description="Unix time (seconds) of the last change of state")
    constants: dict[str, list[int]] | None = Field(
        None, description="models with per-session constants: each constant's shape in this session"
    )


class StepRequest(BaseModel):
    """The body of ``POST /v1/sessions/{session_id}/step`` (parsed with orjson, documented here)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"inputs": {"x": [[0.5, -1.0, 0.25, 2.0], [0.0, 0.1, 0.2, 0.3]]}},
                {"inputs": {"tokens": [17, 4, 9]}, "step": 12},
            ]
        },
    )

    inputs: dict[str, Annotated[list[Any], Field(min_length=1)]] = Field(
        min_length=1,
        description="one entry per model input, each with a leading T axis (T >= 1): a single timestep of a "
        "[T, 4] input is [[a, b, c, d]]; token models take a flat list of ids, one per timestep",
    )
    step: int | None = Field(
        None,
        ge=0,
        description="the step count the client believes the session is at: equal → applied; a retry of the last "
        "applied request → its outputs again (Idempotent-Replay: true); anything else → 409. Omit to apply in "
        "arrival order.",
    )


class StepResponse(BaseModel):
    session_id: str
    step: int = Field(description="the session's step count after this request")
    outputs: dict[str, list[Any]] = Field(description="one entry per model output, leading T axis")

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"session_id": "q3Zr0m6xH3kAqj9Q7yW1nA", "step": 3, "outputs": {"y": [[]]}}]}
    )


class Problem(BaseModel):
    """RFC 9457 problem details, with a machine-readable ``code``."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {
                    "type": "https://carryover.dev/problems/step_conflict",
                    "title": "Step conflict",
                    "status": 409,
                    "detail": "the session is at step 12, not 9",
                    "code": "step_conflict",
                    "request_id": "6f1c2b4e9d0a4c55b1e2f3a4b5c6d7e8",
                    "current_step": 12,
                }
            ]
        },
    )

    type: str
    title: str
    status: int
    detail: str = Field(description="what is wrong, naming the field or tensor")
    code: str = Field(description="machine-readable, e.g. invalid_input, session_not_found, step_conflict")
    request_id: str | None = Field(None, description="the X-Request-ID of the request")
    current_step: int | None = Field(None, description="step_conflict: the session's current step")
    retry_after: float | None = Field(None, description="503: seconds to wait before retrying (also Retry-After)")
    errors: list[dict[str, Any]] | None = Field(None, description="invalid_input from schema validation: each error")


class Health(BaseModel):
    status: str = Field(examples=["ok"])


ERROR_TEXT = {
    400: "Malformed JSON (code `invalid_json`)",
    404: "Unknown or expired session (`session_not_found`), unknown model (`model_not_found`)",
    409: "Step conflict (`step_conflict`, with `current_step`), existing id (`session_exists`), "
    "state of another model (`model_mismatch`)",
    413: "Body over `max_body_bytes` (`payload_too_large`)",
    415: "Unsupported Content-Type (`unsupported_media_type`)",
    422: "Invalid input (`invalid_input`): the detail names the field or tensor",
    429: "The server holds its limit of sessions (`too_many_sessions`)",
    500: "Unexpected error (`internal`)",
    507: "The session store is full (`store_full`: Redis at maxmemory, noeviction); stored sessions are kept",
    503: "Overloaded, shutting down, not ready or the session store is unavailable; see Retry-After",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {}
    for status in (*statuses, 500):
        entry: dict[str, Any] = {
            "description": ERROR_TEXT[status],
            "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
        if status in (503, 507):
            entry["headers"] = {"Retry-After": {"description": "seconds", "schema": {"type": "integer"}}}
        out[status] = entry
    return out


# The id rule is documented, not validated here: a path id that breaks it is 404, like any absent id.
SessionIdPath = Annotated[
    str,
    Path(
        description="the session's id",
        examples=["q3Zr0m6xH3kAqj9Q7yW1nA"],
        json_schema_extra={"pattern": SESSION_ID.pattern},
    ),
]
REQUEST_ID_DOC = {
    "description": "the request's X-Request-ID if sane (1-128 of A-Z a-z 0-9 . _ -), else a generated one",
    "schema": {"type": "string"},
}
REPLAY_HEADER = {"Idempotent-Replay": {"description": "`true` on a replay", "schema": {"type": "string"}}}
STEP_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {JSON_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/StepRequest"}}},
    }
}
NPZ_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "an .npz archive as GET .../state returns: one array per state tensor, optionally "
        "carryover_step and carryover_fingerprint (checked against the session's model)",
        "content": {
            NPZ_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}},
            BINARY_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


# -- the served models' inputs, exactly (built when the schema is first asked for) -----------------
def inputs_schema(contracts: dict[str, ModelContract], max_steps: int) -> dict[str, Any]:
    """The JSON schema of a step's ``inputs`` for the served models: per model an object with
    each input as nested arrays of its exact shape behind a leading T axis (1..``max_steps``),
    numbers finite in the input's dtype, token ids integers in [0, vocab). More than one model:
    ``anyOf`` them, each titled with its model's name."""
    variants = []
    for name, c in contracts.items():
        properties = {t.name: _tensor_schema(c, t.name, max_steps) for t in c.inputs}
        variants.append(
            {
                "title": name,
                "type": "object",
                "properties": properties,
                "required": list(properties),
                "additionalProperties": False,
            }
        )
    return variants[0] if len(variants) == 1 else {"anyOf": variants}


def _tensor_schema(c: ModelContract, name: str, max_steps: int) -> dict[str, Any]:
    t = next(t for t in c.inputs if t.name == name)
    leaf: dict[str, Any]
    if t.dtype.kind in "iu":
        high = len(c.vocab) - 1 if c.vocab is not None else int(np.iinfo(t.dtype).max) - 1
        leaf = {"type": "integer", "minimum": 0, "maximum": high}
    else:
        bound = FLOAT_BOUND.get(t.dtype.name, 1e300)
        leaf = {"type": "number", "minimum": -bound, "maximum": bound}
    for size in reversed(t.shape):
        leaf = {"type": "array", "items": leaf, "minItems": size, "maxItems": size}
    shape = ", ".join(["T", *map(str, t.shape)])
    return {"type": "array", "items": leaf, "minItems": 1, "maxItems": max_steps, "description": f"[{shape}]"}
