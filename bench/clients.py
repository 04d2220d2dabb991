"""One session's connection to a server, over HTTP, WebSocket JSON or WebSocket binary.

The same code speaks to carryover and to the naive baseline (both take the step body
``{"inputs": {"tokens": [...]}, "step": n?}`` and stream the same WebSocket messages).

HTTP is keep-alive HTTP/1.1 on raw asyncio streams: httpx's connection pool costs more CPU
than the server at these rates (it measured ~250 requests/s here), and the load generator
shares the machine with the server. Replies are checked by status (HTTP) or message kind (WS)
only, not parsed, to keep the generator's CPU low; with ``exactly_once`` the client sends
``step`` and advances it by the chunk length on success.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

import numpy as np
import orjson
from websockets.asyncio.client import ClientConnection, connect

TRANSPORTS = ("http", "ws", "ws-binary")
RESULT_PREFIX = '{"type":"result"'  # both servers write "type" first (orjson keeps key order)


class StepFailed(Exception):
    """The server answered the step with an error (the connection is still usable)."""


@dataclass(frozen=True)
class Chunk:
    """One request's payload, encoded once for every transport."""

    tokens: list[int]
    json: bytes  # {"inputs": {"tokens": [...]}}
    binary: bytes  # little-endian int32 ids

    @classmethod
    def of(cls, tokens: list[int]) -> Chunk:
        return cls(tokens, orjson.dumps({"inputs": {"tokens": tokens}}), np.asarray(tokens, "<i4").tobytes())

    def body(self, step: int | None) -> bytes:
        if step is None:
            return self.json
        return orjson.dumps({"inputs": {"tokens": self.tokens}, "step": step})


class Client(Protocol):
    session_id: str

    async def step(self, chunk: Chunk) -> None:
        """Send one chunk and wait for its reply; ``StepFailed`` on an error reply."""

    async def close(self) -> None: ...


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80


def _parse_head(head: bytes) -> tuple[int, int]:
    """(status, content length) of an HTTP/1.1 response head."""
    lines = head.split(b"\r\n")
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(lines[0].split()[1]), int(value)
    raise StepFailed(f"a response without Content-Length: {lines[0]!r}")


class HttpConnection:
    """A keep-alive HTTP/1.1 connection (requests one at a time, bodies with Content-Length)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str) -> None:
        self.reader, self.writer, self.host = reader, writer, host

    @classmethod
    async def open(cls, url: str) -> HttpConnection:
        host, port = _host_port(url)
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer, host)

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.writer.write(head + body)
        status, length = _parse_head(await self.reader.readuntil(b"\r\n\r\n"))
        return status, await self.reader.readexactly(length)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


class HttpClient:
    """``POST /v1/sessions`` once, then ``POST /v1/sessions/{id}/step`` per chunk."""

    def __init__(self, connection: HttpConnection, session_id: str, exactly_once: bool) -> None:
        self.connection, self.session_id = connection, session_id
        self.path = f"/v1/sessions/{session_id}/step"
        self.next_step: int | None = 0 if exactly_once else None

    async def step(self, chunk: Chunk) -> None:
        status, reply = await self.connection.request("POST", self.path, chunk.body(self.next_step))
        if status != 200:
            raise StepFailed(f"HTTP {status}: {reply[:200]!r}")
        if self.next_step is not None:
            self.next_step += len(chunk.tokens)

    async def close(self) -> None:
        await self.connection.close()


class WsClient:
    """``WS /v1/stream`` (a new session), one chunk in flight; text JSON or binary int32 frames."""

    def __init__(self, ws: ClientConnection, session_id: str, binary: bool, exactly_once: bool) -> None:
        self.ws, self.session_id, self.binary = ws, session_id, binary
        self.next_step: int | None = 0 if exactly_once and not binary else None

    async def step(self, chunk: Chunk) -> None:
        await self.ws.send(chunk.binary if self.binary else chunk.body(self.next_step).decode())
        reply = await self.ws.recv()
        if self.binary:
            if not isinstance(reply, bytes):
                raise StepFailed(f"an error instead of a binary result: {reply[:200]}")
        elif not isinstance(reply, str) or not reply.startswith(RESULT_PREFIX):
            raise StepFailed(f"not a result: {reply[:200]!r}")
        if self.next_step is not None:
            self.next_step += len(chunk.tokens)

    async def close(self) -> None:
        await self.ws.close()


async def open_client(url: str, transport: str, exactly_once: bool = False) -> Client:
    """A new session on the server at ``url``, reached over ``transport`` (one of ``TRANSPORTS``)."""
    if transport == "http":
        connection = await HttpConnection.open(url)
        status, reply = await connection.request("POST", "/v1/sessions", b"{}")
        if status != 201:
            await connection.close()
            raise StepFailed(f"creating a session: HTTP {status}: {reply[:200]!r}")
        return HttpClient(connection, orjson.loads(reply)["session_id"], exactly_once)
    if transport in ("ws", "ws-binary"):
        ws = await connect(url.replace("http://", "ws://", 1) + "/v1/stream", max_size=None)
        hello = orjson.loads(await ws.recv())
        if hello.get("type") != "session":
            await ws.close()
            raise StepFailed(f"opening a stream: {hello}")
        return WsClient(ws, hello["session_id"], transport == "ws-binary", exactly_once)
    raise ValueError(f"unknown transport {transport!r}; choose from {TRANSPORTS}")
