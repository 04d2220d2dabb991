"""Open Inference Protocol v2 (KServe v2 / Triton's HTTP API) with Triton's sequence extension,
so ``tritonclient`` works unchanged. A thin transport: parse → ``SessionService`` → reply.

* A sequence (``parameters.sequence_id``: uint64 or string) is a session in the same store,
  named by ``sequence_session_id``: ``sequence_start`` creates it (or resets it to the initial
  state), each request steps it, ``sequence_end`` deletes it after the step. A request for a
  sequence that is not active and has no ``sequence_start`` is 404. No sequence (absent, 0 or
  ""): the inputs run from the initial state and nothing is stored.
* Tensors carry the protocol's batch axis, one row: ``[1, T, ...]`` as the model metadata
  declares, or ``[T, ...]`` without it; outputs come back in the form the inputs used.
* Errors are ``{"error": "..."}``, built by ``service/api/problems.py`` from the typed errors.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import re
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, FastAPI, Request
from starlette.responses import Response

from service.api.auth import AUTHENTICATED
from service.api.state import app_state, owner_of
from service.api.v2_tensors import (
    HEADER_LENGTH,
    InferRequest,
    InputTensor,
    datatype_of,
    decompress,
    encode_reply,
    parse_infer,
)
from service.errors import InvalidInput, ModelNotFound, NotReady, SessionNotFound
from service.sequences import run_fresh, start_over
from service.sessions import ModelContract, SessionService, StepCall, is_session_id

SERVER_NAME = "carryover"
EXTENSIONS = ["binary_tensor_data", "sequence"]
MODEL_VERSION = "1"  # every served model has one version
PLATFORM = "onnxruntime_onnx"
UINT64_MAX = 2**64 - 1
PLAIN_MODEL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,48}$")

# Not in the OpenAPI schema: the Open Inference Protocol is its own specification, and its
# JSON-then-raw-bytes bodies are beyond what OpenAPI can describe (docs/v2.md documents them).
router = APIRouter(strict_content_type=False, include_in_schema=False)  # models and inference: authenticated
server = APIRouter(include_in_schema=False)  # server metadata and health: open, like /healthz and /readyz


def _json(data: Any) -> Response:
    return Response(orjson.dumps(data), media_type="application/json")


def sequence_session_id(model: str, sequence: int | str) -> str:
    """The session of sequence ``sequence`` of ``model``: ``~v2.<model>.<id>``, a derived id (the
    leading ``~`` is outside the session id rule, so no client can choose it). Ints are their
    digits; strings ``s<string>`` when they follow the rule (up to 64 characters), else ``~`` +
    32 hex of their SHA-256; a model name outside ``PLAIN_MODEL_NAME`` is ``~`` + 16 hex of its
    SHA-256. The forms start with different characters, so they cannot collide."""
    model_part = model if PLAIN_MODEL_NAME.match(model) else "~" + _sha256(model)[:16]
    if isinstance(sequence, int):
        id_part = str(sequence)
    elif is_session_id(sequence) and len(sequence) <= 64:
        id_part = "s" + sequence
    else:
        id_part = "~" + _sha256(sequence)[:32]
    return f"~v2.{model_part}.{id_part}"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _sessions(request: Request) -> SessionService:
    return app_state(request.app).session_service()


def _contract(sessions: SessionService, model: str, version: str | None) -> ModelContract:
    """The contract of ``model`` (``ModelNotFound`` unless served, at ``MODEL_VERSION``)."""
    if model not in sessions.models:
        raise ModelNotFound(f"model {model!r} is not served; served models: {sorted(sessions.models)}")
    if version not in (None, "", MODEL_VERSION):
        raise ModelNotFound(f"model {model!r} has no version {version!r}; its one version is {MODEL_VERSION!r}")
    return sessions.model(model).contract


# -- server and model metadata, health --------------------------------------------------------------
@server.get("/v2", summary="Server metadata")
async def server_metadata() -> Response:
    try:
        version = importlib.metadata.version(SERVER_NAME)
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that is not installed
        version = "unknown"
    return _json({"name": SERVER_NAME, "version": version, "extensions": EXTENSIONS})


@server.get("/v2/health/live", summary="Liveness")
async def live() -> Response:
    return _json({"live": True})


@server.get("/v2/health/ready", summary="Readiness: models loaded and the store answering")
async def ready(request: Request) -> Response:
    state = app_state(request.app)
    if not state.ready:
        raise NotReady("the service is " + ("shutting down" if state.shutting_down else "starting"))
    await state.session_service().ping()
    return _json({"ready": True})


@router.get("/v2/models/{model}", summary="Model metadata")
@router.get("/v2/models/{model}/versions/{version}", summary="Model metadata")
async def model_metadata(request: Request, model: str, version: str | None = None) -> Response:
    c = _contract(_sessions(request), model, version)

    def tensors(items: Any) -> list[dict[str, Any]]:
        return [{"name": t.name, "datatype": datatype_of(t.dtype), "shape": [1, -1, *t.shape]} for t in items]

    return _json(
        {
            "name": model,
            "versions": [MODEL_VERSION],
            "platform": PLATFORM,
            "inputs": tensors(c.inputs),
            "outputs": tensors(c.outputs),
        }
    )


@router.get("/v2/models/{model}/ready", summary="Model readiness")
@router.get("/v2/models/{model}/versions/{version}/ready", summary="Model readiness")
async def model_ready(request: Request, model: str, version: str | None = None) -> Response:
    _contract(_sessions(request), model, version)
    if not app_state(request.app).ready:
        raise NotReady("the service is not ready")
    return _json({"name": model, "ready": True})


# -- inference --------------------------------------------------------------------------------------
@router.post("/v2/models/{model}/infer", summary="Inference (Triton's sequence extension)")
@router.post("/v2/models/{model}/versions/{version}/infer", summary="Inference (Triton's sequence extension)")
async def infer(request: Request, model: str, version: str | None = None) -> Response:
    sessions = _sessions(request)
    contract = _contract(sessions, model, version)
    limit = app_state(request.app).settings.max_body_bytes
    body = decompress(await request.body(), request.headers.get("content-encoding"), limit)
    req = parse_infer(body, request.headers.get(HEADER_LENGTH))
    sequence, start, end = _sequence(req.parameters)
    inputs, batched = _steps(contract, req.inputs)
    wanted = _wanted(contract, req)  # checked before anything runs: a bad request changes nothing
    head: dict[str, Any] = {"model_name": model, "model_version": MODEL_VERSION}
    if req.id is not None:
        head["id"] = req.id
    owner = owner_of(request)
    if sequence is None:
        outputs = await run_fresh(sessions, model, inputs)
    else:
        session_id = sequence_session_id(model, sequence)
        if start:  # checks the inputs first: a bad request never resets a sequence
            await start_over(sessions, session_id, model, inputs, owner)
        try:
            reply = await sessions.apply(session_id, StepCall(inputs), owner)
        except SessionNotFound:
            raise SessionNotFound(
                f"sequence {sequence!r} of model {model!r} is not active (never started, ended or expired); "
                "start it with sequence_start"
            ) from None
        if end:
            with contextlib.suppress(SessionNotFound):  # ended concurrently: released either way
                await sessions.delete(session_id, owner)
        outputs = reply.outputs
        head["parameters"] = {"sequence_id": sequence, "sequence_step": reply.step}
    reply_tensors = [(name, outputs[name][None] if batched else outputs[name], binary) for name, binary in wanted]
    content, headers = encode_reply(head, reply_tensors)
    return Response(content, headers=headers)


def _sequence(parameters: dict[str, Any]) -> tuple[int | str | None, bool, bool]:
    """``(sequence_id or None, sequence_start, sequence_end)`` from the request's parameters."""
    sequence = parameters.get("sequence_id", 0)
    if isinstance(sequence, bool) or not isinstance(sequence, int | str):
        raise InvalidInput("parameter 'sequence_id' must be an unsigned 64-bit integer or a string")
    if isinstance(sequence, int) and not 0 <= sequence <= UINT64_MAX:
        raise InvalidInput("parameter 'sequence_id' must be an unsigned 64-bit integer or a string")
    flags = []
    for name in ("sequence_start", "sequence_end"):
        value = parameters.get(name, False)
        if not isinstance(value, bool):
            raise InvalidInput(f"parameter {name!r} must be true or false")
        flags.append(value)
    if sequence in (0, ""):
        if any(flags):
            raise InvalidInput("sequence_start and sequence_end need a sequence_id (0 and '' mean no sequence)")
        return None, False, False
    return sequence, flags[0], flags[1]


def _steps(contract: ModelContract, tensors: list[InputTensor]) -> tuple[dict[str, np.ndarray], bool]:
    """The ``[T, ...]`` arrays of the inputs, and whether they came with the batch axis."""
    by_name = {t.name: t for t in contract.inputs}
    out, forms = {}, set()
    for tensor in tensors:
        t = by_name.get(tensor.name)
        if t is None:
            raise InvalidInput(f"unknown input {tensor.name!r}; the model takes {sorted(by_name)}")
        want = datatype_of(t.dtype)
        if tensor.datatype != want:
            raise InvalidInput(f"input {t.name!r} has datatype {tensor.datatype}; the model expects {want}")
        shape, step_shape = tensor.array.shape, tuple(t.shape)
        if len(shape) == len(step_shape) + 2 and shape[0] == 1 and shape[2:] == step_shape:
            out[t.name], batched = tensor.array[0], True
        elif len(shape) == len(step_shape) + 1 and shape[1:] == step_shape:
            out[t.name], batched = tensor.array, False
        else:
            expected = ", ".join(str(d) for d in step_shape)
            sep = ", " if step_shape else ""
            raise InvalidInput(
                f"input {t.name!r} has shape {list(shape)}; the model expects [1, T{sep}{expected}] "
                f"(one sequence per request) or [T{sep}{expected}]"
            )
        forms.add(batched)
    if len(forms) > 1:
        raise InvalidInput("inputs mix shapes with and without the batch axis; use one form for all")
    return out, forms == {True}


def _wanted(contract: ModelContract, req: InferRequest) -> list[tuple[str, bool]]:
    """``(output name, as binary)`` in reply order: the requested outputs, else all of them."""
    names = [t.name for t in contract.outputs]
    if req.outputs is None:
        return [(name, req.binary_output) for name in names]
    for o in req.outputs:
        if o.name not in names:
            raise InvalidInput(f"unknown output {o.name!r}; the model returns {names}")
    return [(o.name, req.binary_output if o.binary is None else o.binary) for o in req.outputs]


def install_v2(app: FastAPI) -> None:
    """Mount the ``/v2`` routes (their errors are shaped by ``problems.py``'s handlers); with API
    keys on, every route under ``/v2/models`` takes ``Authorization: Bearer <key>``."""
    app.include_router(server)
    app.include_router(router, dependencies=AUTHENTICATED)
