"""HTTP routes (docs/websocket.md, README): parse → ``SessionService`` → reply, nothing more.

Step bodies are decoded with orjson and parsed by ``service.sessions.parse_step``; replies are
serialised with orjson straight from numpy (no pydantic on the hot path). The OpenAPI models
are in ``schemas.py`` and ``openapi.py``; every failure is an RFC 9457
``application/problem+json`` built by ``problems.py``; request ids, the body limit, metrics and
the access log live in ``middleware.py``. The step route is served by ``fast_route.py`` (same
auth, same ``step_reply``, same problem handlers) without FastAPI's router; the route here
stays for OpenAPI and for what that path does not take.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Annotated, Any
from urllib.parse import quote

import numpy as np
import orjson
from fastapi import APIRouter, Body, Depends, FastAPI, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from service.api.auth import AUTHENTICATED
from service.api.fast_route import FastRoute
from service.api.middleware import RequestContextMiddleware
from service.api.openapi import install_openapi
from service.api.problems import install_problem_handlers
from service.api.schemas import (
    JSON_MEDIA_TYPE,
    NPZ_BODY,
    NPZ_MEDIA_TYPE,
    REPLAY_HEADER,
    STEP_BODY,
    CreateSessionRequest,
    Health,
    ModelsResponse,
    SessionCreated,
    SessionIdPath,
    SessionMetadata,
    StepResponse,
    error_responses,
)
from service.api.sse import GENERATE_BODY, GENERATE_RESPONSE, sse_response
from service.api.state import AppState, app_state, owner_of
from service.errors import CarryoverError, InvalidInput, InvalidJson, NotReady, UnsupportedMediaType
from service.sessions import SessionInfo, SessionService, parse_generate, parse_step

NPZ_MEDIA_TYPES = frozenset({NPZ_MEDIA_TYPE, "application/octet-stream", "application/zip"})

# Not strict: a JSON body without a Content-Type is read as JSON (``require_json`` rejects others).
router = APIRouter(strict_content_type=False)  # /v1: included behind the API key (service.api.auth)
operations = APIRouter()  # health, readiness, metrics: open (docs/security.md)


# -- parsing helpers ------------------------------------------------------------------------------
def _sessions(request: Request) -> SessionService:
    return app_state(request.app).session_service()


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
    responses=error_responses(),
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
        **error_responses(400, 404, 409, 413, 415, 422, 429, 503, 507),
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
        model=spec.model,
        session_id=spec.session_id,
        ttl_s=spec.ttl_s,
        fork_from=spec.fork_from,
        owner=owner_of(request),
        constants=spec.constants,
    )
    return _json(_created(info), 201, {"Location": f"/v1/sessions/{quote(info.session_id, safe='')}"})


@router.get(
    "/v1/sessions/{session_id}",
    tags=["sessions"],
    operation_id="getSession",
    summary="A session's metadata",
    response_model=SessionMetadata,
    responses=error_responses(404, 503),
)
async def get_session(request: Request, session_id: SessionIdPath) -> Response:
    info = await _sessions(request).get(session_id, owner=owner_of(request))
    data = dataclasses.asdict(info)
    if not data["constants"]:  # only a model with constants reports them
        del data["constants"]
    return _json(data)


@router.post(
    "/v1/sessions/{session_id}/step",
    tags=["sessions"],
    operation_id="stepSession",
    summary="Run timesteps through the session",
    response_model=StepResponse,
    responses={200: {"headers": REPLAY_HEADER}, **error_responses(400, 404, 409, 413, 415, 422, 503, 507)},
    openapi_extra=STEP_BODY,
)
async def step_session(request: Request, session_id: SessionIdPath) -> Response:
    """Apply ``inputs`` (leading T axis) to the session's state, exactly once when ``step`` is
    given. The reply holds the outputs of these timesteps and the session's new step count."""
    return await step_reply(request, session_id)


async def step_reply(request: Request, session_id: str) -> Response:
    """The step route's work once authenticated; ``service.api.fast_route`` serves it too."""
    call = parse_step(await _json_body(request))
    reply = await _sessions(request).apply(session_id, call, owner=owner_of(request))
    headers = {"Idempotent-Replay": "true"} if reply.replay else None
    started = time.perf_counter()
    response = _json({"session_id": reply.session_id, "step": reply.step, "outputs": reply.outputs}, headers=headers)
    app_state(request.app).metrics.serialize_seconds.labels("http").observe(time.perf_counter() - started)
    return response


@router.post(
    "/v1/sessions/{session_id}/generate",
    tags=["sessions"],
    operation_id="generate",
    summary="Generate tokens through the session (token LMs), streamed as server-sent events",
    response_class=Response,
    responses={**GENERATE_RESPONSE, **error_responses(400, 404, 409, 413, 415, 422, 503)},
    openapi_extra=GENERATE_BODY,
)
async def generate(request: Request, session_id: SessionIdPath) -> Response:
    """Feed the prompt, then sample and feed one token per scheduler iteration (continuous
    batching). Each token event is sent after the write that applied it; afterwards the session
    has consumed the prompt and every generated token. Errors before the first token are the
    usual problem replies (409 with ``current_step`` when ``step`` is not the session's)."""
    call = parse_generate(await _json_body(request))
    stream = await _sessions(request).generate(session_id, call, owner=owner_of(request))
    return await sse_response(stream)


@router.post(
    "/v1/sessions/{session_id}/reset",
    tags=["sessions"],
    operation_id="resetSession",
    summary="State back to initial, step 0",
    status_code=204,
    response_class=Response,
    responses=error_responses(404, 409, 503, 507),
)
async def reset_session(request: Request, session_id: SessionIdPath) -> Response:
    await _sessions(request).reset(session_id, owner=owner_of(request))
    return Response(status_code=204)


@router.delete(
    "/v1/sessions/{session_id}",
    tags=["sessions"],
    operation_id="deleteSession",
    summary="Delete a session",
    status_code=204,
    response_class=Response,
    responses=error_responses(404, 503),
)
async def delete_session(request: Request, session_id: SessionIdPath) -> Response:
    await _sessions(request).delete(session_id, owner=owner_of(request))
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
        **error_responses(404, 409, 503),
    },
)
async def export_state(request: Request, session_id: SessionIdPath) -> Response:
    data = await _sessions(request).export_state(session_id, owner=owner_of(request))
    disposition = f"attachment; filename*=UTF-8''{quote(session_id, safe='')}.npz"
    return Response(data, media_type=NPZ_MEDIA_TYPE, headers={"Content-Disposition": disposition})


@router.put(
    "/v1/sessions/{session_id}/state",
    tags=["sessions"],
    operation_id="importState",
    summary="Replace the session's state with an uploaded .npz",
    response_model=SessionMetadata,
    responses=error_responses(404, 409, 413, 415, 422, 503, 507),
    openapi_extra=NPZ_BODY,
)
async def import_state(request: Request, session_id: SessionIdPath) -> Response:
    """Validated before anything is written: names, shapes, dtypes, finite values and the model
    fingerprint (409 ``model_mismatch`` for state of another model)."""
    media = _media_type(request)
    if media is not None and media not in NPZ_MEDIA_TYPES:
        raise UnsupportedMediaType(f"Content-Type {media!r} is not accepted here; send {NPZ_MEDIA_TYPE}")
    data = await request.body()
    if not data:
        raise InvalidInput("the body is empty; send the .npz archive that GET .../state returns")
    info = await _sessions(request).import_state(session_id, data, owner=owner_of(request))
    return _json(dataclasses.asdict(info))


# -- operations -----------------------------------------------------------------------------------
@operations.get("/healthz", tags=["operations"], operation_id="healthz", summary="Liveness", response_model=Health)
async def healthz() -> Response:
    """200 while the process runs."""
    return _json({"status": "ok"})


@operations.get(
    "/readyz",
    tags=["operations"],
    operation_id="readyz",
    summary="Readiness: models loaded and Redis answering",
    response_model=Health,
    responses=error_responses(503),
)
async def readyz(request: Request) -> Response:
    state = app_state(request.app)
    if not state.ready:
        raise NotReady("the service is " + ("shutting down" if state.shutting_down else "starting"))
    await state.session_service().ping()
    return _json({"status": "ready"})


@operations.get(
    "/metrics",
    tags=["operations"],
    operation_id="metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}}},
)
async def metrics(request: Request) -> Response:
    state = app_state(request.app)
    if state.sessions is not None:
        state.metrics.prepare(state.sessions.models)
        with contextlib.suppress(CarryoverError):  # a scrape still answers while Redis is away
            await state.sessions.count()  # O(1): sets the sessions gauge
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def install_http(app: FastAPI, state: AppState) -> None:
    """Routes, problem+json error handlers, the request middleware and the OpenAPI additions."""
    app.include_router(router, dependencies=AUTHENTICATED)
    app.include_router(operations)
    install_problem_handlers(app)
    # Added first, so it runs inside the request middleware (ids, body limit, log, metrics).
    step = next(r for r in router.routes if getattr(r, "endpoint", None) is step_session)
    app.add_middleware(FastRoute, route=step, handler=step_reply)
    app.add_middleware(
        RequestContextMiddleware,
        max_body_bytes=state.settings.max_body_bytes,
        metrics=state.metrics,
        access_log=state.settings.access_log,
    )
    install_openapi(app)
