"""The asyncio shell around the client core: ``httpx.AsyncClient`` for HTTP,
``websockets.asyncio`` for streams. Same methods as the sync shell (``sync.py``); all protocol
decisions are in ``core.py``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import httpx
import numpy as np

from service.client import core
from service.client.core import Call, CarryoverClientError, GenerationEvent, RetryPolicy, SessionCore, StepResult

T = TypeVar("T")


class AsyncSession(SessionCore):
    """A server-side session seen from the async client; ``step_count`` is the last known step."""

    def __init__(self, client: AsyncClient, info: Mapping[str, Any]) -> None:
        super().__init__(info)
        self.client = client

    async def step(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Apply one request (leading T axis) exactly once, retrying safely."""
        return await self.client.call(self.step_call(inputs))

    async def stream(self, chunks: Iterable[Mapping[str, Any]], in_flight: int = 4) -> AsyncIterator[StepResult]:
        """Send chunks over a WebSocket, up to ``in_flight`` pipelined; yields replies in order."""
        from websockets.asyncio.client import connect

        async with connect(self.stream_url(self.client.base_url), max_size=None) as ws:
            window = self.window(chunks, in_flight, await ws.recv())
            while True:
                while (body := window.to_send()) is not None:
                    await ws.send(body)
                if window.done:
                    return
                yield window.received(await ws.recv())

    async def generate(self, prompt: str | Sequence[int] = "", **options: Any) -> AsyncIterator[GenerationEvent]:
        """Generate on the server (token LMs); as :meth:`service.client.Session.generate`."""
        from httpx_sse import aconnect_sse

        request = self.generate_request(prompt, **options)
        try:
            async with aconnect_sse(
                self.client.http, request.method, request.path, content=request.content, headers=request.headers
            ) as source:
                if source.response.status_code >= 400:
                    await source.response.aread()
                    raise CarryoverClientError.from_reply(source.response)
                async for sse in source.aiter_sse():
                    if (event := self.generation_event(sse.event, sse.data)) is not None:
                        yield event
        except httpx.TransportError as e:
            raise CarryoverClientError(0, "transport", str(e)) from e

    async def info(self) -> dict[str, Any]:
        """The session's metadata (``step``, ``expires_in``, ...)."""
        return await self.client.call(self.info_call())

    async def state(self) -> dict[str, np.ndarray]:
        """Export the state: one array per state tensor, plus ``carryover_*`` metadata."""
        return await self.client.call(self.state_call())

    async def load_state(self, npz_bytes: bytes) -> None:
        """Import a state exported by :meth:`state` (as ``.npz`` bytes)."""
        await self.client.call(self.load_state_call(npz_bytes))

    async def reset(self) -> None:
        """Back to the initial state, step 0."""
        await self.client.call(self.reset_call())

    async def delete(self) -> None:
        await self.client.call(self.delete_call())


class AsyncClient:
    """Async client of one carryover server."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        timeout: float = 30.0,
        retries: int = 5,
        backoff: float = 0.1,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry = RetryPolicy(retries, backoff)
        self.http = http or httpx.AsyncClient(base_url=self.base_url, timeout=timeout)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.http.aclose()

    async def models(self) -> list[dict[str, Any]]:
        """The served models (inputs, outputs, vocab, fingerprint, ...)."""
        return await self.call(core.models_call())

    async def create(
        self,
        model: str | None = None,
        *,
        session_id: str | None = None,
        ttl_s: int | None = None,
        fork_from: str | None = None,
        constants: Mapping[str, Any] | None = None,
    ) -> AsyncSession:
        """A new session (of the server's default model unless ``model``; a copy of ``fork_from``);
        ``constants``: a model's per-session constants, e.g. ``{"memory": array [L, D]}``."""
        return AsyncSession(self, await self.call(core.create_call(model, session_id, ttl_s, fork_from, constants)))

    async def session(self, session_id: str) -> AsyncSession:
        """Attach to an existing session (learns its current step)."""
        return AsyncSession(self, await self.call(core.session_call(session_id)))

    async def call(self, call: Call[T]) -> T:
        """Send a core call, retrying as the core decides, and parse its reply."""
        request = call.request
        for attempt in range(self.retry.retries + 1):
            reply, error = None, None
            try:
                reply = await self.http.request(
                    request.method, request.path, content=request.content, headers=request.headers
                )
            except httpx.TransportError as e:
                error = e
            outcome = self.retry.outcome(attempt, reply, error)
            if not isinstance(outcome, float):
                return call.parse(outcome)
            await asyncio.sleep(outcome)
        raise AssertionError("unreachable: the last attempt returns or raises")
