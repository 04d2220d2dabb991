"""The application's typed state: one ``AppState`` on ``app.state.carryover``, built by the
composition (``service.app``) and read by every route. It also owns the one drain: stop
readiness, then answer and close the open WebSocket streams (``drain``)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Protocol

from starlette.applications import Starlette
from starlette.requests import HTTPConnection

from service.api.problems import CLOSE_RESTART
from service.config import Settings
from service.errors import NotReady, Unauthorized
from service.metrics import Metrics
from service.sessions import SessionService

ANONYMOUS = ""  # the owner of every session when API keys are off
OWNER_STATE = "carryover_owner"  # where service.api.auth puts the caller's owner (request.state)
DRAIN_TIMEOUT_S = 10.0  # how long in-flight WebSocket chunks may take before connections are cut


class Stream(Protocol):
    """An open WebSocket stream, as the drain sees it (``service.api.ws`` implements it)."""

    @property
    def finished(self) -> asyncio.Event: ...

    def drain(self, code: int, reason: str) -> None:
        """Stop reading; answer what was read, then close with ``code``."""

    def abort(self) -> None:
        """Cut a drain short: close now."""


@dataclass(eq=False)
class AppState:
    settings: Settings
    metrics: Metrics
    sessions: SessionService | None = None  # set by the lifespan once models and store are up
    ready: bool = False
    shutting_down: bool = False
    streams: set[Stream] = field(default_factory=set)
    _drained: asyncio.Task[None] | None = None

    def session_service(self) -> SessionService:
        """The session service, or ``NotReady`` while the app is starting."""
        if self.sessions is None:
            raise NotReady("the service is starting")
        return self.sessions

    async def drain(self) -> None:
        """Idempotent: not ready, refuse new streams, then ``close_streams``. Both the draining
        server (before uvicorn closes WebSockets itself) and the lifespan's shutdown call it."""
        self.ready, self.shutting_down = False, True
        if self._drained is None:
            self._drained = asyncio.ensure_future(self.close_streams())
        await self._drained

    async def close_streams(self, timeout_s: float = DRAIN_TIMEOUT_S) -> None:
        """Stop reading on every open stream, answer the chunks already read (within
        ``timeout_s``), then close each with 1012 (server restarting)."""
        streams = list(self.streams)
        if not streams:
            return
        for s in streams:
            s.drain(CLOSE_RESTART, "server restarting")
        waiters = {asyncio.ensure_future(s.finished.wait()): s for s in streams}
        _, late = await asyncio.wait(waiters, timeout=timeout_s)
        for waiter in late:
            waiters[waiter].abort()
        if late:
            await asyncio.wait(late, timeout=1.0)
        for waiter in waiters:
            waiter.cancel()


def install_state(app: Starlette, state: AppState) -> None:
    app.state.carryover = state


def app_state(app: Starlette) -> AppState:
    """The ``AppState`` that ``install_state`` put on ``app``."""
    state = getattr(app.state, "carryover", None)
    if not isinstance(state, AppState):
        raise LookupError("not a carryover app: app.state.carryover is missing")
    return state


def owner_of(connection: HTTPConnection) -> str:
    """The owner of the sessions a request (HTTP or WebSocket) may touch, as ``service.api.auth``
    found it from the request's API key. Every route passes it on. Fails closed: with API keys
    configured, a connection that was never authenticated is ``Unauthorized``, not anonymous."""
    owner = getattr(connection.state, OWNER_STATE, None)
    if isinstance(owner, str):
        return owner
    if app_state(connection.app).settings.api_keys_file is None:
        return ANONYMOUS
    raise Unauthorized("this route was reached without authentication")
