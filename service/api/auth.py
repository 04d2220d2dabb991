"""Access control at the edge: who is calling (an API key → its owner), and the per-key limits
that belong to a transport (open WebSockets). Session ownership itself is the sessions layer's
rule: every route passes the owner found here (``service.api.state.owner_of``) down.

* HTTP: ``AUTHENTICATED``, the dependency list a router is included with (``/v1`` here, and any
  later API the same way), reads ``Authorization: Bearer <key>``; no or an unknown key is 401
  with ``WWW-Authenticate: Bearer``. It also spends one token of the key's request rate limit.
* WebSocket: ``authenticate_websocket`` takes the handshake's ``Authorization`` header or, since
  browsers cannot set headers, a first message ``{"type": "auth", "api_key": "..."}`` within
  ``ws_auth_timeout_s``.

Without ``api_keys_file`` every caller is the one anonymous owner and nothing is asked. Keys are
compared by hash (``service.keys``) and never logged.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any

import orjson
from fastapi import Depends, FastAPI, Request, WebSocket
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.requests import HTTPConnection

from service.api.state import ANONYMOUS, OWNER_STATE, app_state
from service.config import Settings
from service.errors import TooManyStreams, Unauthorized
from service.keys import KeyRing

AUTH_MESSAGE = '{"type": "auth", "api_key": "..."}'
BEARER = HTTPBearer(
    auto_error=False,  # our own 401 (problem+json), and no key at all when keys are off
    scheme_name="apiKey",
    description="An API key of the server's key file (`carryover keys add NAME`), as `Authorization: Bearer <key>`.",
)


@dataclass(eq=False)
class Auth:
    """The key ring (``None``: keys off) and this process's open WebSockets per owner."""

    keys: KeyRing | None
    max_streams: int = 0
    streams: collections.Counter[str] = field(default_factory=collections.Counter)

    @classmethod
    def from_settings(cls, settings: Settings) -> Auth:
        keys = KeyRing(settings.api_keys_file) if settings.api_keys_file is not None else None
        return cls(keys, settings.max_streams_per_key)

    def owner(self, presented: str | None) -> str:
        """The owner of a presented key; ``Unauthorized`` for none or an unknown one."""
        if self.keys is None:
            return ANONYMOUS
        if not presented:
            raise Unauthorized("this server needs an API key: send Authorization: Bearer <key>")
        key = self.keys.authenticate(presented)
        if key is None:
            raise Unauthorized("the API key is not valid (unknown, or removed from the server's key file)")
        return key.owner

    def reload(self) -> None:
        """Re-read the key file now (SIGHUP); a bad file keeps the last good keys."""
        if self.keys is not None:
            self.keys.reload()

    @contextlib.contextmanager
    def stream_slot(self, owner: str) -> Iterator[None]:
        """Hold one of ``owner``'s open-WebSocket slots (per process; ``TooManyStreams`` if none)."""
        if self.max_streams and self.streams[owner] >= self.max_streams:
            raise TooManyStreams(f"this API key holds its limit of {self.max_streams} open WebSocket connections")
        self.streams[owner] += 1
        try:
            yield
        finally:
            self.streams[owner] -= 1
            if self.streams[owner] <= 0:
                del self.streams[owner]


def install_auth(app: FastAPI, settings: Settings) -> Auth:
    """Build the ``Auth`` of ``settings`` (loads the key file: a bad one fails start-up) on ``app``."""
    auth = Auth.from_settings(settings)
    app.state.carryover_auth = auth
    return auth


def auth_of(connection: HTTPConnection) -> Auth:
    auth = getattr(connection.app.state, "carryover_auth", None)
    if not isinstance(auth, Auth):
        raise LookupError("install_auth was not called on this app")
    return auth


async def authenticate(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]
) -> str:
    """The HTTP dependency: the caller's owner (also put on the request for ``owner_of``), after
    one token of its rate limit."""
    owner = auth_of(request).owner(credentials.credentials if credentials is not None else None)
    setattr(request.state, OWNER_STATE, owner)
    await app_state(request.app).session_service().admit(owner)
    return owner


AUTHENTICATED: list[Any] = [Depends(authenticate)]  # app.include_router(router, dependencies=AUTHENTICATED)


async def authenticate_websocket(websocket: WebSocket) -> str:
    """The owner of an accepted WebSocket: by its handshake's ``Authorization`` header, else by
    its first message (within ``ws_auth_timeout_s``); also one token of its rate limit.
    ``Unauthorized`` otherwise (the caller answers and closes 1008)."""
    auth = auth_of(websocket)
    state = app_state(websocket.app)
    if auth.keys is None:
        owner = ANONYMOUS
    elif (header := websocket.headers.get("authorization")) is not None:
        scheme, _, presented = header.partition(" ")
        owner = auth.owner(presented.strip() if scheme.lower() == "bearer" else None)
    else:
        owner = auth.owner(await _auth_message(websocket, state.settings.ws_auth_timeout_s))
    setattr(websocket.state, OWNER_STATE, owner)
    await state.session_service().admit(owner)
    return owner


async def _auth_message(websocket: WebSocket, timeout_s: float) -> str:
    """The key of the first message, which must be the auth message."""
    try:
        async with asyncio.timeout(timeout_s):
            message = await websocket.receive()
    except TimeoutError:
        raise Unauthorized(
            f"no Authorization header and no auth message {AUTH_MESSAGE} within {timeout_s:g} s"
        ) from None
    text = message.get("text")
    try:
        data = orjson.loads(text) if isinstance(text, str) else None
    except orjson.JSONDecodeError:
        data = None
    key = data.get("api_key") if isinstance(data, dict) and data.get("type") == "auth" else None
    if not isinstance(key, str) or not key:
        if message["type"] == "websocket.disconnect":
            raise Unauthorized("the client left before authenticating")
        raise Unauthorized(f"without an Authorization header the first message must be {AUTH_MESSAGE}")
    return key
