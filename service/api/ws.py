"""WebSocket streaming (DESIGN §4): one connection streams chunks through one session.

Routes
------
``WS /v1/sessions/{session_id}/stream`` attaches to an existing session; ``WS /v1/stream?model=NAME``
creates one (``model`` optional: the default model). Either way the server accepts, then sends first::

    {"type": "session", "session_id": "…", "model": "gru", "step": 42, "expires_in": 86400.0}

``step`` is the session's current step count, so a client that reconnects knows where to resume. An
unknown session (or model) is answered with an error message, then a close: the connection is
accepted first so the client can read the problem (see *Errors* for the codes).

Chunks (client → server)
------------------------
Each message is one chunk, applied to the session in the order received:

* **Text**: a JSON object shaped like the HTTP step body, ``{"inputs": {"x": [[…], …]}, "step": n?,
  "id": …?}``: leading T axis, ``step`` for exactly-once (as over HTTP), ``id`` any JSON scalar,
  echoed in that chunk's reply.
* **Binary**: for models with exactly one input. Float models: raw little-endian float32, ``T × F``
  values (``F`` the product of the input's per-step shape; ``T`` = length / 4F). Token models:
  little-endian int32 token ids, one per timestep (widened to int64). A length that is not a whole
  number of timesteps, or zero, is an error. Binary chunks have no ``step`` (arrival order).

A failed chunk is skipped and the later ones still apply. A client that must not apply past a gap
puts ``step`` in every chunk: after a failure the later chunks then fail with ``step_conflict``.

Replies (server → client)
-------------------------
Exactly one reply per chunk, strictly in chunk order, up to ``ws_max_in_flight`` chunks pipelined:

* to a text chunk, text ``{"type": "result", "step": n, "outputs": {"y": [[…], …]}, "replay": false,
  "id": …}`` (``step``: the step count after the chunk; ``id`` only if the chunk had one);
* to a binary chunk, a binary frame: a 16-byte little-endian header ``<qII`` = (step: int64,
  T: uint32, O: uint32), then ``T × O`` little-endian float32 values of the model's *first* output
  (``O`` the product of its per-step shape). In Python::

      step, t, o = struct.unpack_from("<qII", frame)
      y = np.frombuffer(frame, "<f4", offset=16).reshape(t, o)

* to a chunk that fails, text ``{"type": "error", "problem_type": …, "title": …, "status": …,
  "detail": …, "code": …, …}``: the problem fields of the HTTP error (RFC 9457; its ``type`` URI is
  renamed ``problem_type``), plus ``id`` when the chunk had one, e.g. ``current_step`` on a
  ``step_conflict`` and ``retry_after`` on 503s.

Errors
------
A bad chunk (invalid JSON, wrong shape or length, NaN, unknown input, ``step`` conflict, …) gets an
error reply in its place in the order; the session's state and step are unchanged and the connection
stays usable. Errors after which the connection is useless close it, **always after an error
message** and after the replies (results or errors) of the chunks already in flight, so every chunk
the server read is answered and none is applied silently:

=====  ======================================================================================
1009   message over ``max_body_bytes`` (``payload_too_large``)
1011   an internal error (a bug or a failed model call), never for the reasons below
1012   the server is restarting: ``close_all`` at shutdown (no error message; in-flight chunks are
       answered first, within ``DRAIN_TIMEOUT_S``), or a connection opened while shutting down
1013   retry later: queue full (``overloaded``), Redis down (``store_unavailable``), ``shutting_down``
4404   unknown or expired session, unknown model (4000 + the HTTP status of other setup failures)
=====  ======================================================================================

1008 (policy) is reserved for authentication once API keys exist. The close reason is the problem
``code``. Under uvicorn, its own shutdown closes open WebSockets with 1012 before the app's lifespan
shutdown runs ``close_all``; ``carryover serve`` therefore runs ``service.serve.DrainingServer``,
which calls ``close_all`` first (with ``--workers > 1`` uvicorn's plain server is used). Open
connections are counted in the ``carryover_websocket_connections`` gauge.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
from fastapi import FastAPI, WebSocket

from service.api.problems import error_problem
from service.engine.contract import ModelContract
from service.errors import (
    CarryoverError,
    InvalidInput,
    Overloaded,
    PayloadTooLarge,
    SessionNotFound,
    ShuttingDown,
    Unavailable,
)
from service.sessions import SessionInfo, SessionService

if TYPE_CHECKING:
    from service.engine.scheduler import StepReply

log = logging.getLogger(__name__)

REPLY_HEADER = struct.Struct("<qII")  # step, T, O: the header of a binary reply
DRAIN_TIMEOUT_S = 10.0  # close_all: how long in-flight chunks may take before connections are cut
CLOSE_TOO_BIG, CLOSE_INTERNAL, CLOSE_RESTART, CLOSE_TRY_AGAIN = 1009, 1011, 1012, 1013
CHUNK_KEYS = frozenset({"inputs", "step", "id"})
RETRYABLE = (Overloaded, ShuttingDown, Unavailable)


def install_ws(app: FastAPI) -> None:
    """Add the two streaming routes to ``app``."""
    app.add_api_websocket_route("/v1/sessions/{session_id}/stream", stream_session, name="stream_session")
    app.add_api_websocket_route("/v1/stream", stream_new_session, name="stream_new_session")


async def close_all(app: FastAPI, timeout_s: float = DRAIN_TIMEOUT_S) -> None:
    """Stop reading on every open connection, answer the chunks already read (within
    ``timeout_s``), then close each with 1012 (server restarting)."""
    connections: list[_Connection] = list(getattr(app.state, "websockets", ()))
    if not connections:
        return
    for c in connections:
        c.drain(CLOSE_RESTART, "server restarting")
    waiters = {asyncio.ensure_future(c.finished.wait()): c for c in connections}
    _, late = await asyncio.wait(waiters, timeout=timeout_s)
    for waiter in late:
        waiters[waiter].abort()
    if late:
        await asyncio.wait(late, timeout=1.0)
    for waiter in waiters:
        waiter.cancel()


async def stream_session(websocket: WebSocket, session_id: str) -> None:
    """Attach to an existing session and stream chunks through it."""

    async def attach(sessions: SessionService) -> SessionInfo:
        return await sessions.get(session_id)

    await _serve(websocket, attach)


async def stream_new_session(websocket: WebSocket, model: str | None = None) -> None:
    """Create a session (of ``model``, default: the default model) and stream chunks through it."""

    async def create(sessions: SessionService) -> SessionInfo:
        return await sessions.create(model=model)

    await _serve(websocket, create)


# -- framing (pure functions) ---------------------------------------------------------------------
@dataclass(frozen=True)
class Chunk:
    inputs: dict[str, Any]
    step: int | None = None
    id: Any = None
    binary: bool = False


def parse_text(text: str) -> Chunk:
    """A text chunk: ``{"inputs": {...}, "step": n?, "id": ...?}``. Shapes are checked later, by
    ``SessionService.step``; this checks only the envelope."""
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError as e:
        raise InvalidInput(f"the message is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise InvalidInput('a text message must be a JSON object: {"inputs": {...}, "step": n?, "id": ...?}')
    chunk_id = data.get("id")
    if isinstance(chunk_id, dict | list):
        raise InvalidInput("'id' must be a string, number or boolean")
    unknown = sorted(set(data) - CHUNK_KEYS)
    if unknown:
        raise BadChunk(f"unknown field(s) {unknown}; a chunk has 'inputs', 'step' and 'id'", chunk_id)
    if "inputs" not in data:
        raise BadChunk("the chunk has no 'inputs'", chunk_id)
    step = data.get("step")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        raise BadChunk("'step' must be a non-negative integer", chunk_id)
    return Chunk(inputs=data["inputs"], step=step, id=chunk_id)


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
    return Chunk(inputs={t.name: array}, binary=True)


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


def error_message(error: CarryoverError, chunk_id: Any = None) -> str:
    """``{"type": "error", ...problem fields}``; the problem's ``type`` URI becomes ``problem_type``."""
    body = error_problem(error)
    message: dict[str, Any] = {"type": "error", "problem_type": body.pop("type"), **body}
    if chunk_id is not None:
        message["id"] = chunk_id
    return orjson.dumps(message).decode()


def closes_connection(error: CarryoverError) -> int | None:
    """The close code an error ends the connection with, or ``None``: reply and keep going."""
    if isinstance(error, RETRYABLE):
        return CLOSE_TRY_AGAIN
    if isinstance(error, PayloadTooLarge):
        return CLOSE_TOO_BIG
    if isinstance(error, SessionNotFound):
        return 4000 + error.status
    if error.status >= 500:
        return CLOSE_INTERNAL
    return None


def _setup_close_code(error: CarryoverError) -> int:
    return closes_connection(error) or 4000 + error.status


class BadChunk(InvalidInput):
    """An ``InvalidInput`` raised once the chunk's ``id`` is known, so the error can echo it."""

    def __init__(self, detail: str, chunk_id: Any) -> None:
        super().__init__(detail)
        self.chunk_id = chunk_id


def _message_size(message: Mapping[str, Any]) -> int:
    text = message.get("text")
    if text is not None:
        return len(text) if text.isascii() else len(text.encode())
    return len(message.get("bytes") or b"")


# -- one connection ---------------------------------------------------------------------------------
@dataclass(eq=False)
class _Item:
    """One entry of the reply queue: a chunk being stepped, a chunk already rejected, or the close."""

    chunk: Chunk | None = None
    task: asyncio.Task[StepReply] | None = None
    error: CarryoverError | None = None
    close: tuple[int, str] | None = None


Opener = Callable[[SessionService], Awaitable[SessionInfo]]


async def _serve(websocket: WebSocket, open_session: Opener) -> None:
    state = websocket.app.state
    connection = _Connection(websocket, state.sessions, state.settings.max_body_bytes, state.settings.ws_max_in_flight)
    state.websockets.add(connection)
    state.metrics.ws_connections.inc()
    try:
        await websocket.accept()
        if state.shutting_down:
            connection.drain(CLOSE_RESTART, "server restarting")
        await connection.run(open_session)
    finally:
        state.websockets.discard(connection)
        state.metrics.ws_connections.dec()
        connection.finished.set()


class _Connection:
    """A reader task (receive, parse, start the step) and a writer task (await each chunk's step in
    order, send its reply) joined by a queue; a semaphore of ``max_in_flight`` slots, taken before
    each read and given back after each reply, is the backpressure."""

    def __init__(self, websocket: WebSocket, sessions: SessionService, max_bytes: int, max_in_flight: int) -> None:
        self.websocket = websocket
        self.sessions = sessions
        self.max_bytes = max_bytes
        self.slots = asyncio.Semaphore(max_in_flight)
        self.queue: asyncio.Queue[_Item] = asyncio.Queue()
        self.finished = asyncio.Event()
        self.session_id = ""
        self.contract: ModelContract | None = None
        self.reader: asyncio.Task[bool] | None = None
        self.writer: asyncio.Task[None] | None = None
        self.stop: tuple[int, str] | None = None  # set once: the close that ends this connection
        self.steps: set[asyncio.Task[StepReply]] = set()
        self.closed = False

    async def run(self, open_session: Opener) -> None:
        try:
            if self.stop is None:
                try:
                    info = await open_session(self.sessions)
                    self.contract = self.sessions.model(info.model).contract
                except CarryoverError as e:
                    await self._send(error_message(e))
                    self.stop = (_setup_close_code(e), e.code)
                else:
                    self.session_id = info.session_id
                    await self._send(_session_message(info))
            if self.stop is not None:
                return
            self.reader = asyncio.create_task(self._read())
            self.writer = asyncio.create_task(self._write())
            done, _ = await asyncio.wait({self.reader, self.writer}, return_when=asyncio.FIRST_COMPLETED)
            if self.reader in done and not self.reader.cancelled() and self.reader.result():
                return  # the client went away: nobody to answer
            await asyncio.wait({self.writer})  # drain: answer what was read, then the close
            if not self.writer.cancelled() and (error := self.writer.exception()) is not None:
                raise error
        except Exception:
            log.exception("WebSocket connection failed")
            self.stop = self.stop or (CLOSE_INTERNAL, "internal")
        finally:
            for task in (self.reader, self.writer, *self.steps):
                if task is not None:
                    task.cancel()
            if self.stop is not None and not self.closed:
                self.closed = True
                with contextlib.suppress(Exception):
                    await self.websocket.close(*self.stop)

    def drain(self, code: int, reason: str) -> None:
        """Stop reading; the writer answers what is queued, then closes with ``code``."""
        if self.stop is not None:
            return
        self.stop = (code, reason)
        if self.reader is not None:
            self.reader.cancel()
            self.queue.put_nowait(_Item(close=self.stop))

    def abort(self) -> None:
        """Cut the drain short (close_all's timeout): ``run`` closes with the stop code."""
        for task in (self.writer, *self.steps):
            if task is not None:
                task.cancel()

    async def _read(self) -> bool:
        """Read and start chunks until the client goes away (True) or reading must stop (False)."""
        while True:
            await self.slots.acquire()
            try:
                message = await self.websocket.receive()
            except Exception:  # the transport failed under us: as good as a disconnect
                log.debug("WebSocket receive failed", exc_info=True)
                return True
            if message["type"] == "websocket.disconnect":
                return True
            try:
                if _message_size(message) > self.max_bytes:
                    error = PayloadTooLarge(f"the message is over the limit of {self.max_bytes} bytes")
                    self.queue.put_nowait(_Item(error=error))
                    return False
                item = self._start(message)
            except Exception:
                log.exception("WebSocket chunk could not be started")
                self.queue.put_nowait(_Item(error=CarryoverError("internal error while reading the message")))
                return False
            self.queue.put_nowait(item)

    def _start(self, message: Mapping[str, Any]) -> _Item:
        assert self.contract is not None
        text = message.get("text")
        try:
            chunk = parse_text(text) if text is not None else decode_binary(self.contract, message.get("bytes") or b"")
        except InvalidInput as e:
            chunk_id = e.chunk_id if isinstance(e, BadChunk) else None
            return _Item(chunk=Chunk({}, id=chunk_id, binary=text is None), error=e)
        task = asyncio.create_task(self.sessions.step(self.session_id, chunk.inputs, chunk.step))
        self.steps.add(task)
        task.add_done_callback(self._step_done)
        return _Item(chunk=chunk, task=task)

    def _step_done(self, task: asyncio.Task[StepReply]) -> None:
        self.steps.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved here too: a reply cut short by a disconnect is not a leak

    async def _write(self) -> None:
        """Answer the queue in order; on an error that ends the connection, answer the chunks
        already read, then close."""
        assert self.contract is not None
        while True:
            item = await self.queue.get()
            if item.close is not None:
                self.closed = True
                with contextlib.suppress(Exception):
                    await self.websocket.close(*item.close)
                return
            chunk = item.chunk or Chunk({})
            try:
                if item.error is not None:
                    raise item.error
                assert item.task is not None
                reply: str | bytes = encode_result(chunk, await item.task, self.contract)
            except CarryoverError as e:
                reply = error_message(e, chunk.id)
                if (code := closes_connection(e)) is not None:
                    self.drain(code, e.code)
            except Exception as e:  # a bug: answer, then 1011
                log.exception("WebSocket chunk failed")
                reply = error_message(CarryoverError(f"internal error: {type(e).__name__}"), chunk.id)
                self.drain(CLOSE_INTERNAL, "internal")
            if not await self._send(reply):
                return
            self.slots.release()

    async def _send(self, data: str | bytes) -> bool:
        """Send one frame; False when the client is gone."""
        try:
            if isinstance(data, bytes):
                await self.websocket.send_bytes(data)
            else:
                await self.websocket.send_text(data)
        except Exception:  # closed by the client, by uvicorn's shutdown, or mid-write
            log.debug("WebSocket send failed: the client is gone", exc_info=True)
            return False
        return True


def _session_message(info: SessionInfo) -> str:
    return orjson.dumps(
        {
            "type": "session",
            "session_id": info.session_id,
            "model": info.model,
            "step": info.step,
            "expires_in": info.expires_in,
        }
    ).decode()
