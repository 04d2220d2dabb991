"""WebSocket streaming (docs/websocket.md, README): one connection streams chunks through one session. The
protocol (messages, replies, close codes) is docs/websocket.md; its framing is ``ws_protocol``.
A ``generate`` message is answered by its token messages and then its ``done``, in its place in
the reply order; a ``cancel`` message stops the generation it names (it has no reply)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, WebSocket
from prometheus_client import Histogram

from service.api.auth import auth_of, authenticate_websocket
from service.api.problems import (
    CLOSE_INTERNAL,
    CLOSE_RESTART,
    ws_close_code,
    ws_error_message,
    ws_setup_close_code,
)
from service.api.state import app_state
from service.api.ws_protocol import (
    MESSAGE_TYPE,
    Chunk,
    decode_binary,
    done_message,
    encode_result,
    generate_call,
    message_size,
    read_text,
    session_message,
    text_chunk,
    token_message,
)
from service.errors import CarryoverError, IdleTimeout, InvalidInput, PayloadTooLarge
from service.sessions import (
    DoneEvent,
    GenerationStream,
    ModelContract,
    SessionInfo,
    SessionService,
    StepCall,
    StepReply,
)

log = logging.getLogger(__name__)


def install_ws(app: FastAPI) -> None:
    """Add the two streaming routes to ``app``."""
    app.add_api_websocket_route("/v1/sessions/{session_id}/stream", stream_session, name="stream_session")
    app.add_api_websocket_route("/v1/stream", stream_new_session, name="stream_new_session")


async def stream_session(websocket: WebSocket, session_id: str) -> None:
    """Attach to an existing session and stream chunks through it."""

    async def attach(sessions: SessionService, owner: str) -> SessionInfo:
        return await sessions.get(session_id, owner=owner)

    await _serve(websocket, attach)


async def stream_new_session(websocket: WebSocket, model: str | None = None) -> None:
    """Create a session (of ``model``, default: the default model) and stream chunks through it."""

    async def create(sessions: SessionService, owner: str) -> SessionInfo:
        return await sessions.create(model=model, owner=owner)

    await _serve(websocket, create)


# -- one connection ---------------------------------------------------------------------------------
@dataclass(eq=False)
class _Item:
    """One entry of the reply queue: a chunk being stepped, a generation, a chunk already
    rejected, or the close."""

    chunk: Chunk | None = None
    task: asyncio.Future[StepReply] | None = None  # the step's scheduler future, or its apply task
    generation: asyncio.Task[GenerationStream] | None = None
    error: CarryoverError | None = None
    close: tuple[int, str] | None = None


Opener = Callable[[SessionService, str], Awaitable[SessionInfo]]


@dataclass(frozen=True)
class _Limits:
    """One connection's limits: message bytes, pipelined chunks, and seconds of silence."""

    max_bytes: int
    max_in_flight: int
    idle_timeout_s: float


async def _serve(websocket: WebSocket, open_session: Opener) -> None:
    state = app_state(websocket.app)
    settings = state.settings
    connection = _Connection(
        websocket,
        state.session_service(),
        _Limits(settings.ws_message_limit, settings.ws_max_in_flight, settings.ws_idle_timeout_s),
    )
    connection.serialize_seconds = state.metrics.serialize_seconds.labels("ws")
    state.streams.add(connection)
    state.metrics.ws_connections.inc()
    try:
        await websocket.accept()
        if state.shutting_down:
            connection.drain(CLOSE_RESTART, "server restarting")
        await connection.run(open_session)
    finally:
        state.streams.discard(connection)
        state.metrics.ws_connections.dec()
        connection.finished.set()


class _Connection:
    """A reader task (receive, parse, start the step) and a writer task (await each chunk's step in
    order, send its reply) joined by a queue; a semaphore of ``max_in_flight`` slots, taken before
    each read and given back after each reply, is the backpressure."""

    def __init__(self, websocket: WebSocket, sessions: SessionService, limits: _Limits) -> None:
        self.websocket = websocket
        self.sessions = sessions
        self.owner = ""  # set by authentication, the first thing ``run`` does
        self.slot = contextlib.ExitStack()  # the owner's open-stream slot, held until the end
        self.max_bytes = limits.max_bytes
        self.idle_timeout_s = limits.idle_timeout_s
        self.slots = asyncio.Semaphore(limits.max_in_flight)
        self.queue: asyncio.Queue[_Item] = asyncio.Queue()
        self.finished = asyncio.Event()
        self.session_id = ""
        self.contract: ModelContract | None = None
        self.reader: asyncio.Task[bool] | None = None
        self.writer: asyncio.Task[None] | None = None
        self.watchdog: asyncio.Task[None] | None = None  # ``_watch_idle``
        self.last_message = asyncio.get_running_loop().time()
        self.idle = False  # set by the watchdog just before it cancels the reader
        self.stop: tuple[int, str] | None = None  # set once: the close that ends this connection
        self.steps: set[asyncio.Future[StepReply]] = set()
        self.generations: dict[asyncio.Task[GenerationStream], Any] = {}  # started, not yet answered: id
        self.closed = False
        self.serialize_seconds: Histogram | None = None  # the /metrics stage "serialisation"

    async def run(self, open_session: Opener) -> None:
        try:
            if self.stop is None:
                try:
                    self.owner = await authenticate_websocket(self.websocket)
                    self.slot.enter_context(auth_of(self.websocket).stream_slot(self.owner))
                    info = await open_session(self.sessions, self.owner)
                    self.contract = self.sessions.model(info.model).contract
                except CarryoverError as e:
                    await self._send(ws_error_message(e))
                    self.stop = (ws_setup_close_code(e), e.code)
                else:
                    self.session_id = info.session_id
                    await self._send(session_message(info))
            if self.stop is not None:
                return
            self.reader = asyncio.create_task(self._read())
            self.writer = asyncio.create_task(self._write())
            self.watchdog = asyncio.create_task(self._watch_idle())
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
            self._cancel_generations()  # nobody will read them: stop at the next token boundary
            self.slot.close()
            for task in (self.reader, self.writer, self.watchdog, *self.steps):
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
        self._cancel_generations()  # answered with their tokens so far and a "cancelled" done
        if self.reader is not None:
            self.reader.cancel()
            self.queue.put_nowait(_Item(close=self.stop))

    def abort(self) -> None:
        """Cut the drain short (the app drain's timeout): ``run`` closes with the stop code."""
        for task in (self.writer, *self.steps):
            if task is not None:
                task.cancel()

    async def _read(self) -> bool:
        """Read and start chunks until the client goes away (True) or reading must stop (False)."""
        while True:
            try:
                await self.slots.acquire()
                message = await self.websocket.receive()
                self.last_message = asyncio.get_running_loop().time()
            except asyncio.CancelledError:
                if not self.idle:  # a drain's cancel, not the idle watchdog's
                    raise
                idle = IdleTimeout(f"no message for {self.idle_timeout_s:g} s (setting ws_idle_timeout_s)")
                self.queue.put_nowait(_Item(error=idle))
                return False
            except Exception:  # the transport failed under us: as good as a disconnect
                log.debug("WebSocket receive failed", exc_info=True)
                return True
            if message["type"] == "websocket.disconnect":
                return True
            try:
                if message_size(message) > self.max_bytes:
                    error = PayloadTooLarge(
                        f"the message is over the limit of {self.max_bytes} bytes (setting ws_max_message_bytes)"
                    )
                    self.queue.put_nowait(_Item(error=error))
                    return False
                await self.sessions.admit(self.owner)  # the key's rate limit: each chunk is a request
                item = self._start(message)
            except CarryoverError as e:  # rate limited, or Redis away: answered, then closed
                self.queue.put_nowait(_Item(error=e))
                return False
            except Exception:
                log.exception("WebSocket chunk could not be started")
                self.queue.put_nowait(_Item(error=CarryoverError("internal error while reading the message")))
                return False
            if item is None:  # a cancel: no reply of its own
                self.slots.release()
                continue
            self.queue.put_nowait(item)

    async def _watch_idle(self) -> None:
        """Cancel the reader after ``idle_timeout_s`` of silence with nothing in flight (a client
        waiting for a long chunk's reply is not idle). One timer per connection instead of one
        per message: a timeout around every receive was ~8 % of the event loop at 256 sessions."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(max(0.0, self.last_message + self.idle_timeout_s - loop.time()))
            if loop.time() - self.last_message < self.idle_timeout_s:
                continue  # a message came meanwhile
            if self.steps or self.generations or not self.queue.empty():
                self.last_message = loop.time()  # busy, not idle: look again a whole timeout later
                continue
            if self.reader is not None:
                self.idle = True
                self.reader.cancel()
            return

    def _start(self, message: Mapping[str, Any]) -> _Item | None:
        assert self.contract is not None
        text = message.get("text")
        chunk_id = None
        try:
            if text is not None:
                data, chunk_id = read_text(text)
                kind = data.get(MESSAGE_TYPE)
                if kind == "cancel":
                    self._cancel_generations(chunk_id)
                    return None
                if kind == "generate":
                    return self._start_generation(data, chunk_id)
                if kind is not None:
                    raise InvalidInput(
                        f"unknown message type {kind!r:.40}; types: 'generate', 'cancel', or none (a step)"
                    )
                chunk = text_chunk(data, chunk_id)
            else:
                chunk = decode_binary(self.contract, message.get("bytes") or b"")
        except InvalidInput as e:  # answered in its place, echoing the id if it was read
            return _Item(chunk=Chunk(StepCall({}), id=chunk_id, binary=text is None), error=e)
        # One model: the scheduler's future itself (a task per chunk was ~5 % of the loop at 256
        # sessions); the reply's session id is not sent, so it may be the stored key.
        try:
            step = self.sessions.apply_nowait(self.session_id, chunk.call, owner=self.owner)
        except CarryoverError as e:  # e.g. inputs that do not fit the model: answered in its place
            return _Item(chunk=chunk, error=e)
        if step is None:
            step = asyncio.create_task(self.sessions.apply(self.session_id, chunk.call, owner=self.owner))
        self.steps.add(step)
        step.add_done_callback(self._step_done)
        return _Item(chunk=chunk, task=step)

    def _start_generation(self, data: dict[str, Any], chunk_id: Any) -> _Item:
        call = generate_call(data)  # InvalidInput: answered in its place
        task = asyncio.create_task(self.sessions.generate(self.session_id, call, owner=self.owner))
        self.generations[task] = chunk_id
        task.add_done_callback(_retrieve)
        return _Item(chunk=Chunk(StepCall({}), id=chunk_id), generation=task)

    def _cancel_generations(self, chunk_id: Any = None) -> None:
        """Cancel the started generations (those with ``chunk_id``, when given) at their next
        token boundary; one not yet running is cancelled as soon as it has started."""
        for task, started_id in list(self.generations.items()):
            if chunk_id is None or started_id == chunk_id:
                task.add_done_callback(_cancel_stream)

    def _step_done(self, task: asyncio.Future[StepReply]) -> None:
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
            chunk = item.chunk or Chunk(StepCall({}))
            try:
                if item.error is not None:
                    raise item.error
                if item.generation is not None:
                    done = await self._stream(item.generation, chunk.id)
                    if done is None:
                        return  # the client is gone
                    reply: str | bytes = done
                else:
                    assert item.task is not None
                    result = await item.task
                    started = time.perf_counter()
                    reply = encode_result(chunk, result, self.contract)
                    if self.serialize_seconds is not None:
                        self.serialize_seconds.observe(time.perf_counter() - started)
            except CarryoverError as e:
                reply = ws_error_message(e, chunk.id)
                if (code := ws_close_code(e)) is not None:
                    self.drain(code, e.code)
            except Exception as e:  # a bug: answer, then 1011
                log.exception("WebSocket chunk failed")
                reply = ws_error_message(CarryoverError(f"internal error: {type(e).__name__}"), chunk.id)
                self.drain(CLOSE_INTERNAL, "internal")
            if not await self._send(reply):
                return
            self.slots.release()

    async def _stream(self, task: asyncio.Task[GenerationStream], chunk_id: Any) -> str | None:
        """Send a generation's token messages; its done message to send, or None if the client
        went away (the generation then stops at the next token boundary)."""
        try:
            stream = await task
            try:
                async for event in stream:
                    if isinstance(event, DoneEvent):
                        return done_message(event, chunk_id)
                    if not await self._send(token_message(event, chunk_id)):
                        return None
            finally:
                stream.cancel()
        finally:
            self.generations.pop(task, None)
        raise CarryoverError("the generation ended without a done event")

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


def _retrieve(task: asyncio.Task[GenerationStream]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved here too: a generation whose reply was cut short is not a leak


def _cancel_stream(task: asyncio.Task[GenerationStream]) -> None:
    if not task.cancelled() and task.exception() is None:
        task.result().cancel()
