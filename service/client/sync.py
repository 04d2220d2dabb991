"""The blocking shell around the client core: ``httpx.Client`` for HTTP, ``websockets.sync``
for streams. All protocol decisions are in ``core.py``."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import httpx
import numpy as np

from service.client import core
from service.client.core import Call, CarryoverClientError, GenerationEvent, RetryPolicy, SessionCore, StepResult

T = TypeVar("T")


class Session(SessionCore):
    """A server-side session seen from the sync client; ``step_count`` is the last known step."""

    def __init__(self, client: Client, info: Mapping[str, Any]) -> None:
        super().__init__(info)
        self.client = client

    def step(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Apply one request (leading T axis) exactly once, retrying safely."""
        return self.client.call(self.step_call(inputs))

    def stream(self, chunks: Iterable[Mapping[str, Any]], in_flight: int = 4) -> Iterator[StepResult]:
        """Send chunks over a WebSocket, up to ``in_flight`` pipelined; yields replies in order."""
        from websockets.sync.client import connect

        with connect(self.stream_url(self.client.base_url), max_size=None) as ws:
            window = self.window(chunks, in_flight, ws.recv())
            while True:
                while (body := window.to_send()) is not None:
                    ws.send(body)
                if window.done:
                    return
                yield window.received(ws.recv())

    def generate(self, prompt: str | Sequence[int] = "", **options: Any) -> Iterator[GenerationEvent]:
        """Generate on the server (token LMs): feed ``prompt`` (text or ids), then sample
        ``max_tokens`` (``temperature``: 0 is greedy; ``top_k``, ``top_p``, ``seed``, ``stop``).
        Yields a :class:`GeneratedToken` per token as it streams, then a :class:`GenerationDone`;
        the session keeps everything generated. Stopping early stops the server at a token
        boundary."""
        from httpx_sse import connect_sse

        request = self.generate_request(prompt, **options)
        try:
            with connect_sse(
                self.client.http, request.method, request.path, content=request.content, headers=request.headers
            ) as source:
                if source.response.status_code >= 400:
                    source.response.read()
                    raise CarryoverClientError.from_reply(source.response)
                for sse in source.iter_sse():
                    if (event := self.generation_event(sse.event, sse.data)) is not None:
                        yield event
        except httpx.TransportError as e:
            raise CarryoverClientError(0, "transport", str(e)) from e

    def info(self) -> dict[str, Any]:
        """The session's metadata (``step``, ``expires_in``, ...)."""
        return self.client.call(self.info_call())

    def state(self) -> dict[str, np.ndarray]:
        """Export the state: one array per state tensor, plus ``carryover_*`` metadata."""
        return self.client.call(self.state_call())

    def load_state(self, npz_bytes: bytes) -> None:
        """Import a state exported by :meth:`state` (as ``.npz`` bytes)."""
        self.client.call(self.load_state_call(npz_bytes))

    def reset(self) -> None:
        """Back to the initial state, step 0."""
        self.client.call(self.reset_call())

    def delete(self) -> None:
        self.client.call(self.delete_call())


class Client:
    """Sync client of one carryover server."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        timeout: float = 30.0,
        retries: int = 5,
        backoff: float = 0.1,
        http: httpx.Client | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry = RetryPolicy(retries, backoff)
        self.http = http or httpx.Client(base_url=self.base_url, timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def models(self) -> list[dict[str, Any]]:
        """The served models (inputs, outputs, vocab, fingerprint, ...)."""
        return self.call(core.models_call())

    def create(
        self,
        model: str | None = None,
        *,
        session_id: str | None = None,
        ttl_s: int | None = None,
        fork_from: str | None = None,
        constants: Mapping[str, Any] | None = None,
    ) -> Session:
        """A new session (of the server's default model unless ``model``; a copy of ``fork_from``);
        ``constants``: a model's per-session constants, e.g. ``{"memory": array [L, D]}``."""
        return Session(self, self.call(core.create_call(model, session_id, ttl_s, fork_from, constants)))

    def session(self, session_id: str) -> Session:
        """Attach to an existing session (learns its current step)."""
        return Session(self, self.call(core.session_call(session_id)))

    def call(self, call: Call[T]) -> T:
        """Send a core call, retrying as the core decides, and parse its reply."""
        request = call.request
        for attempt in range(self.retry.retries + 1):
            reply, error = None, None
            try:
                reply = self.http.request(
                    request.method, request.path, content=request.content, headers=request.headers
                )
            except httpx.TransportError as e:
                error = e
            outcome = self.retry.outcome(attempt, reply, error)
            if not isinstance(outcome, float):
                return call.parse(outcome)
            time.sleep(outcome)
        raise AssertionError("unreachable: the last attempt returns or raises")
