"""HTTP transport (DESIGN §4): parse → ``SessionService`` → reply, nothing more.

Step bodies are parsed with orjson and replies serialised with orjson straight from numpy (no
pydantic on the hot path); the pydantic models below describe those bodies in the OpenAPI
schema. Every failure is an RFC 9457 ``application/problem+json`` built by ``problems.py``;
request ids, the body limit, metrics and the access log live in ``middleware.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Annotated, Any, Literal, cast
from urllib.parse import quote

import numpy as np
import orjson
from fastapi import APIRouter, Body, Depends, FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.responses import Response

from service.api.middleware import RequestContextMiddleware, request_id_of
from service.api.problems import PROBLEM_MEDIA_TYPE, error_problem, http_problem, problem, problem_response
from service.config import Settings
from service.errors import CarryoverError, InvalidInput, InvalidJson, NotReady, Unavailable, UnsupportedMediaType
from service.metrics import Metrics
from service.sessions import CLIENT_ID, SessionInfo, SessionService

log = logging.getLogger(__name__)

OWNER = ""  # API keys are not in scope yet: every session belongs to the anonymous owner
JSON_MEDIA_TYPE = "application/json"
NPZ_MEDIA_TYPE = "application/x-npz"
NPZ_MEDIA_TYPES = frozenset({NPZ_MEDIA_TYPE, "application/octet-stream", "application/zip"})
MAX_TTL_S = 366 * 86_400
STEP_FIELDS = frozenset({"inputs", "step"})


# -- schema (OpenAPI) -----------------------------------------------------------------------------
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
    vocab: str | list[str] | None = Field(None, description="token LMs: the tokens (index = id)")
    unk_id: int | None = Field(None, description="token LMs: the id that text outside the vocab maps to")


class ModelsResponse(BaseModel):
    models: list[ModelInfo]


class CreateSessionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="served model name; default: the first served model")
    session_id: str | None = Field(
        None,
        pattern=CLIENT_ID.pattern,
        description="client-chosen id (1-128 of A-Z a-z 0-9 . _ ~ -); default: 128 random bits, URL-safe",
    )
    ttl_s: int | None = Field(
        None,
        ge=1,
        le=MAX_TTL_S,
        strict=True,
        description="seconds without access before the session expires; default: the server's session_ttl_s",
    )
    fork_from: str | None = Field(None, description="start from a copy of this session's state and step")


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
    503: "Overloaded, shutting down, not ready or the session store is unavailable; see Retry-After",
}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {}
    for status in (*statuses, 500):
        entry: dict[str, Any] = {
            "description": ERROR_TEXT[status],
            "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
        if status == 503:
            entry["headers"] = {"Retry-After": {"description": "seconds", "schema": {"type": "integer"}}}
        out[status] = entry
    return out


SESSION_ID = Annotated[str, Path(description="the session's id", examples=["q3Zr0m6xH3kAqj9Q7yW1nA"])]
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
        "content": {NPZ_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
    }
}

# Not strict: a JSON body without a Content-Type is read as JSON (``require_json`` rejects others).
router = APIRouter(strict_content_type=False)


# -- parsing helpers ------------------------------------------------------------------------------
def _sessions(request: Request) -> SessionService:
    return cast(SessionService, request.app.state.sessions)


def _media_type(request: Request) -> str | None:
    value = request.headers.get("content-type")
    return value.split(";", 1)[0].strip().lower() if value else None


async def require_json(request: Request) -> None:
    """JSON bodies: ``application/json`` (or ``application/*+json``), or no Content-Type at all."""
    media = _media_type(request)
    if media is None or media == JSON_MEDIA_TYPE or (media.startswith("application/") and media.endswith("+json")):
        return
    raise UnsupportedMediaType(f"Content-Type {media!r} is not accepted here; send {JSON_MEDIA_TYPE}")


async def _json_body(request: Request) -> Any:
    await require_json(request)
    body = await request.body()
    if not body:
        raise InvalidJson("the request body is empty; send a JSON object")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        hint = " (JSON has no NaN or Infinity)" if b"NaN" in body or b"Infinity" in body else ""
        raise InvalidJson(f"the body is not valid JSON: {e}{hint}") from None


def parse_step_body(body: Any) -> tuple[dict[str, Any], int | None]:
    """``{"inputs": {...}, "step": n?}`` → (inputs, expected step); arrays are checked later by
    the session service against the model."""
    if not isinstance(body, dict):
        raise InvalidInput('the body must be a JSON object: {"inputs": {"<name>": [...]}, "step": n}')
    unknown = sorted(set(body) - STEP_FIELDS)
    if unknown:
        raise InvalidInput(f"unknown field(s) {unknown} in the body; a step takes 'inputs' and optionally 'step'")
    if "inputs" not in body:
        raise InvalidInput("missing field 'inputs'")
    inputs = body["inputs"]
    if not isinstance(inputs, dict):
        raise InvalidInput("'inputs' must be an object mapping each input name to an array with a leading T axis")
    step = body.get("step")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        raise InvalidInput(f"'step' must be a non-negative integer, not {step!r:.40}")
    return inputs, step


def _numpy_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):  # non-contiguous or an exotic dtype: the slow path
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot serialise {type(value).__name__}")


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY, default=_numpy_default)
    return Response(body, status_code=status, media_type=JSON_MEDIA_TYPE, headers=headers)


def _created(info: SessionInfo) -> dict[str, Any]:
    return {k: getattr(info, k) for k in SessionCreated.model_fields}


# -- /v1 ------------------------------------------------------------------------------------------
@router.get(
    "/v1/models",
    tags=["models"],
    operation_id="listModels",
    summary="The served models",
    response_model=ModelsResponse,
    responses=_errors(),
)
async def list_models(request: Request) -> Response:
    """Name, fingerprint, kind, inputs with shapes and dtypes, state tensors, and for token LMs
    the vocab and ``unk_id``."""
    models = ModelsResponse.model_validate({"models": _sessions(request).describe_models()})
    return _json(models.model_dump(exclude_none=True))


@router.post(
    "/v1/sessions",
    tags=["sessions"],
    operation_id="createSession",
    summary="Create a session (optionally a fork of another)",
    status_code=201,
    response_model=SessionCreated,
    responses={
        201: {"headers": {"Location": {"description": "the session's URL", "schema": {"type": "string"}}}},
        **_errors(400, 404, 409, 413, 415, 422, 429, 503),
    },
    dependencies=[Depends(require_json)],
)
async def create_session(
    request: Request,
    body: Annotated[
        CreateSessionRequest | None,
        Body(
            openapi_examples={
                "default": {"summary": "the default model", "value": {}},
                "named": {"summary": "a model, an id and a TTL", "value": {"model": "charlm", "ttl_s": 3600}},
                "fork": {"summary": "a copy of another session", "value": {"fork_from": "q3Zr0m6xH3kAqj9Q7yW1nA"}},
            }
        ),
    ] = None,
) -> Response:
    spec = body or CreateSessionRequest()
    info = await _sessions(request).create(
        model=spec.model, session_id=spec.session_id, ttl_s=spec.ttl_s, fork_from=spec.fork_from, owner=OWNER
    )
    return _json(_created(info), 201, {"Location": f"/v1/sessions/{quote(info.session_id, safe='')}"})


@router.get(
    "/v1/sessions/{session_id}",
    tags=["sessions"],
    operation_id="getSession",
    summary="A session's metadata",
    response_model=SessionMetadata,
    responses=_errors(404, 503),
)
async def get_session(request: Request, session_id: SESSION_ID) -> Response:
    info = await _sessions(request).get(session_id, owner=OWNER)
    return _json(dataclasses.asdict(info))


@router.post(
    "/v1/sessions/{session_id}/step",
    tags=["sessions"],
    operation_id="stepSession",
    summary="Run timesteps through the session",
    response_model=StepResponse,
    responses={200: {"headers": REPLAY_HEADER}, **_errors(400, 404, 409, 413, 415, 422, 503)},
    openapi_extra=STEP_BODY,
)
async def step_session(request: Request, session_id: SESSION_ID) -> Response:
    """Apply ``inputs`` (leading T axis) to the session's state, exactly once when ``step`` is
    given. The reply holds the outputs of these timesteps and the session's new step count."""
    inputs, expected = parse_step_body(await _json_body(request))
    reply = await _sessions(request).step(session_id, inputs, expected, owner=OWNER)
    headers = {"Idempotent-Replay": "true"} if reply.replay else None
    return _json({"session_id": reply.session_id, "step": reply.step, "outputs": reply.outputs}, headers=headers)


@router.post(
    "/v1/sessions/{session_id}/reset",
    tags=["sessions"],
    operation_id="resetSession",
    summary="State back to initial, step 0",
    status_code=204,
    response_class=Response,
    responses=_errors(404, 409, 503),
)
async def reset_session(request: Request, session_id: SESSION_ID) -> Response:
    await _sessions(request).reset(session_id, owner=OWNER)
    return Response(status_code=204)


@router.delete(
    "/v1/sessions/{session_id}",
    tags=["sessions"],
    operation_id="deleteSession",
    summary="Delete a session",
    status_code=204,
    response_class=Response,
    responses=_errors(404, 503),
)
async def delete_session(request: Request, session_id: SESSION_ID) -> Response:
    await _sessions(request).delete(session_id, owner=OWNER)
    return Response(status_code=204)


@router.get(
    "/v1/sessions/{session_id}/state",
    tags=["sessions"],
    operation_id="exportState",
    summary="Export the session's state as .npz",
    response_class=Response,
    responses={
        200: {
            "description": "an .npz archive: one array per state tensor, plus carryover_step, "
            "carryover_fingerprint and carryover_model",
            "content": {NPZ_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
        },
        **_errors(404, 409, 503),
    },
)
async def export_state(request: Request, session_id: SESSION_ID) -> Response:
    data = await _sessions(request).export_state(session_id, owner=OWNER)
    disposition = f"attachment; filename*=UTF-8''{quote(session_id, safe='')}.npz"
    return Response(data, media_type=NPZ_MEDIA_TYPE, headers={"Content-Disposition": disposition})


@router.put(
    "/v1/sessions/{session_id}/state",
    tags=["sessions"],
    operation_id="importState",
    summary="Replace the session's state with an uploaded .npz",
    response_model=SessionMetadata,
    responses=_errors(404, 409, 413, 415, 422, 503),
    openapi_extra=NPZ_BODY,
)
async def import_state(request: Request, session_id: SESSION_ID) -> Response:
    """Validated before anything is written: names, shapes, dtypes, finite values and the model
    fingerprint (409 ``model_mismatch`` for state of another model)."""
    media = _media_type(request)
    if media is not None and media not in NPZ_MEDIA_TYPES:
        raise UnsupportedMediaType(f"Content-Type {media!r} is not accepted here; send {NPZ_MEDIA_TYPE}")
    data = await request.body()
    if not data:
        raise InvalidInput("the body is empty; send the .npz archive that GET .../state returns")
    info = await _sessions(request).import_state(session_id, data, owner=OWNER)
    return _json(dataclasses.asdict(info))


# -- operations -----------------------------------------------------------------------------------
@router.get("/healthz", tags=["operations"], operation_id="healthz", summary="Liveness", response_model=Health)
async def healthz() -> Response:
    """200 while the process runs."""
    return _json({"status": "ok"})


@router.get(
    "/readyz",
    tags=["operations"],
    operation_id="readyz",
    summary="Readiness: models loaded and Redis answering",
    response_model=Health,
    responses=_errors(503),
)
async def readyz(request: Request) -> Response:
    state = request.app.state
    if not getattr(state, "ready", False):
        raise NotReady("the service is " + ("shutting down" if getattr(state, "shutting_down", False) else "starting"))
    settings = cast(Settings, state.settings)
    try:
        async with asyncio.timeout(settings.redis_timeout_s):
            await _sessions(request).store.ping()
    except Exception as e:  # any failure to answer means: not ready
        raise Unavailable(f"the session store does not answer: {type(e).__name__}: {e}") from None
    return _json({"status": "ready"})


@router.get(
    "/metrics",
    tags=["operations"],
    operation_id="metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}}},
)
async def metrics(request: Request) -> Response:
    collectors = cast(Metrics, request.app.state.metrics)
    sessions = getattr(request.app.state, "sessions", None)
    if isinstance(sessions, SessionService):
        collectors.prepare(sessions.models)
    return Response(generate_latest(collectors.registry), media_type=CONTENT_TYPE_LATEST)


# -- errors → problem+json ------------------------------------------------------------------------
async def _on_carryover_error(request: Request, exc: Exception) -> Response:
    if request.scope["type"] != "http" or not isinstance(exc, CarryoverError):
        raise exc  # a WebSocket's errors are its own transport's business
    if exc.status == 500:  # 503s are expected conditions, counted and in the access log
        log.error(
            "%s %s: %s (request_id=%s)", request.method, request.url.path, exc.detail, request_id_of(request.scope)
        )
    return problem_response(error_problem(exc, request_id_of(request.scope)))


async def _on_http_error(request: Request, exc: Exception) -> Response:
    if request.scope["type"] != "http" or not isinstance(exc, HTTPException):
        raise exc
    headers = dict(exc.headers or {})
    detail = str(exc.detail)
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"no route matches {request.method} {request.url.path}"
    elif exc.status_code == 405 and detail == "Method Not Allowed":
        detail = f"{request.method} is not allowed on {request.url.path}; allowed: {headers.get('Allow', '')}"
    return problem_response(http_problem(exc.status_code, detail, request_id=request_id_of(request.scope)), headers)


def _where(loc: list[Any]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] == "body":
        return ".".join(parts[1:]) or "body"
    return f"{parts[0]} parameter {'.'.join(parts[1:])}" if len(parts) > 1 else ".".join(parts)


async def _on_validation_error(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, RequestValidationError):
        raise exc
    rid = request_id_of(request.scope)
    errors = list(exc.errors())
    bad_json = next((e for e in errors if e.get("type") == "json_invalid"), None)
    if bad_json is not None:
        reason = (bad_json.get("ctx") or {}).get("error", "")
        return problem_response(error_problem(InvalidJson(f"the body is not valid JSON: {reason}"), rid))
    items: list[dict[str, Any]] = [
        {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))} for e in errors
    ]
    detail = "; ".join(f"{_where(item['loc'])}: {item['msg']}" for item in items)
    return problem_response(problem(422, "invalid_input", "Invalid input", detail, request_id=rid, errors=items))


# -- OpenAPI --------------------------------------------------------------------------------------
def _install_openapi(app: FastAPI) -> None:
    """Add the documentation-only schemas (``Problem``, ``StepRequest``) to the components, and
    make every error response problem+json (FastAPI's default 422 is not what we send)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (Problem, StepRequest):
            definition = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(definition.pop("$defs", {}))
            schemas[model.__name__] = definition
        problem_content = {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                for status, response in operation.get("responses", {}).items():
                    if status[:1] in "45":
                        response["content"] = problem_content
                    response.setdefault("headers", {})["X-Request-ID"] = REQUEST_ID_DOC
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend it


def install_http(app: FastAPI) -> None:
    """Routes, problem+json error handlers, the request middleware and the OpenAPI additions.
    Needs ``app.state.settings`` and ``app.state.metrics``; the handlers use ``app.state.sessions``."""
    settings = cast(Settings, app.state.settings)
    app.include_router(router)
    app.add_exception_handler(CarryoverError, _on_carryover_error)
    app.add_exception_handler(HTTPException, _on_http_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_middleware(
        RequestContextMiddleware, max_body_bytes=settings.max_body_bytes, metrics=cast(Metrics, app.state.metrics)
    )
    _install_openapi(app)
