"""Python client for carryover: sync (``Client``) and async (``AsyncClient``).

Exactly-once stepping: every step sends the step count the client believes the session is at
(``"step": n``). A retry after a timeout, a dropped connection or a 503 sends the same request
with the same ``step``; if the first attempt had landed, the server answers with the stored
outputs (``Idempotent-Replay: true``) instead of applying it twice.

    from service.client import Client
    with Client("http://127.0.0.1:8000") as client:
        session = client.create()
        out = session.step({"tokens": [17, 4, 9]})
        for reply in session.stream([{"tokens": [1]}, {"tokens": [2, 3]}]):
            ...
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import orjson

RETRYABLE_STATUS = {502, 503, 504}


class CarryoverClientError(Exception):
    """A problem+json error from the server (or a transport failure after all retries)."""

    def __init__(self, status: int, code: str, detail: str, body: Mapping[str, Any] | None = None) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status, self.code, self.detail = status, code, detail
        self.body = dict(body or {})

    @classmethod
    def from_response(cls, response: httpx.Response) -> CarryoverClientError:
        try:
            body = response.json()
        except ValueError:
            body = {}
        return cls(
            response.status_code, str(body.get("code", "http_error")), str(body.get("detail", response.text)), body
        )


@dataclass
class StepResult:
    step: int
    outputs: dict[str, np.ndarray]
    replay: bool = False


def _body(inputs: Mapping[str, Any], step: int | None) -> bytes:
    payload: dict[str, Any] = {"inputs": dict(inputs)}
    if step is not None:
        payload["step"] = step
    return orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)


def _steps(inputs: Mapping[str, Any]) -> int:
    """T of a request: the leading axis of its (first) input."""
    return len(next(iter(inputs.values())))


def _result(response: httpx.Response) -> StepResult:
    data = orjson.loads(response.content)
    outputs = {k: np.asarray(v, dtype=np.float32) for k, v in data["outputs"].items()}
    return StepResult(int(data["step"]), outputs, response.headers.get("Idempotent-Replay") == "true")


def _retry_delay(response: httpx.Response | None, attempt: int, backoff: float) -> float:
    if response is not None and "Retry-After" in response.headers:
        try:
            return min(float(response.headers["Retry-After"]), 30.0)
        except ValueError:
            pass
    return float(min(backoff * 2**attempt, 5.0))


class _ChunkWindow:
    """The pipelining of ``stream()``, shared by the sync and async sessions: at most
    ``in_flight`` chunks unanswered; each chunk carries the ``step`` the session will be at when
    it applies, so a chunk is never applied twice."""

    def __init__(self, chunks: Iterable[Mapping[str, Any]], in_flight: int, hello: str | bytes) -> None:
        self.chunks = iter(chunks)
        self.in_flight = in_flight
        self.expected = int(_expect_session_message(hello)["step"])
        self.pending = 0
        self.exhausted = False

    def to_send(self) -> str | None:
        """The next chunk to send now, or None (window full or no chunks left)."""
        if self.exhausted or self.pending >= self.in_flight:
            return None
        chunk = next(self.chunks, None)
        if chunk is None:
            self.exhausted = True
            return None
        body = _body(chunk, self.expected).decode()
        self.expected += _steps(chunk)
        self.pending += 1
        return body

    @property
    def done(self) -> bool:
        return self.exhausted and self.pending == 0

    def received(self, raw: str | bytes) -> StepResult:
        self.pending -= 1
        return _ws_reply(raw)


def _create_body(model: str | None, session_id: str | None, ttl_s: int | None, fork_from: str | None) -> dict[str, Any]:
    body = {"model": model, "session_id": session_id, "ttl_s": ttl_s, "fork_from": fork_from}
    return {k: v for k, v in body.items() if v is not None}


def _checked(response: httpx.Response | None, error: httpx.TransportError | None, final: bool) -> httpx.Response | None:
    """The response if it is a success; None to retry; raises when it is final or not retryable."""
    if response is not None:
        if response.status_code < 400:
            return response
        if response.status_code not in RETRYABLE_STATUS or final:
            raise CarryoverClientError.from_response(response)
    elif final:
        raise CarryoverClientError(0, "transport", str(error)) from error
    return None


def _ws_url(base_url: str, path: str) -> str:
    return base_url.replace("http://", "ws://", 1).replace("https://", "wss://", 1).rstrip("/") + path


class Session:
    """A server-side session seen from the sync client; ``step`` is the last known step count."""

    def __init__(self, client: Client, info: Mapping[str, Any]) -> None:
        self.client = client
        self.id: str = info["session_id"]
        self.model: str = info["model"]
        self.step_count: int = int(info["step"])

    def step(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Apply one request (leading T axis) exactly once, retrying safely."""
        result = self.client._step(self.id, inputs, self.step_count)
        self.step_count = result.step
        return result.outputs

    def stream(self, chunks: Iterable[Mapping[str, Any]], in_flight: int = 4) -> Iterator[StepResult]:
        """Send chunks over a WebSocket, up to ``in_flight`` pipelined; yields replies in order."""
        from websockets.sync.client import connect

        with connect(_ws_url(self.client.base_url, f"/v1/sessions/{self.id}/stream"), max_size=None) as ws:
            window = _ChunkWindow(chunks, in_flight, ws.recv())
            while True:
                while (body := window.to_send()) is not None:
                    ws.send(body)
                if window.done:
                    return
                reply = window.received(ws.recv())
                self.step_count = reply.step
                yield reply

    def info(self) -> dict[str, Any]:
        data: dict[str, Any] = self.client._json("GET", f"/v1/sessions/{self.id}")
        self.step_count = int(data["step"])
        return data

    def state(self) -> dict[str, np.ndarray]:
        raw = self.client._request("GET", f"/v1/sessions/{self.id}/state").content
        archive = np.load(io.BytesIO(raw), allow_pickle=False)
        return {k: archive[k] for k in archive.files}

    def load_state(self, npz_bytes: bytes) -> None:
        data = self.client._json(
            "PUT", f"/v1/sessions/{self.id}/state", content=npz_bytes, headers={"Content-Type": "application/x-npz"}
        )
        self.step_count = int(data["step"])

    def reset(self) -> None:
        self.client._request("POST", f"/v1/sessions/{self.id}/reset")
        self.step_count = 0

    def delete(self) -> None:
        self.client._request("DELETE", f"/v1/sessions/{self.id}")


def _expect_session_message(raw: str | bytes) -> dict[str, Any]:
    message: dict[str, Any] = orjson.loads(raw)
    if message.get("type") == "error":
        raise CarryoverClientError(
            int(message.get("status", 0)), str(message.get("code")), str(message.get("detail")), message
        )
    return message


def _ws_reply(raw: str | bytes) -> StepResult:
    message = _expect_session_message(raw)
    outputs = {k: np.asarray(v, dtype=np.float32) for k, v in message["outputs"].items()}
    return StepResult(int(message["step"]), outputs, bool(message.get("replay", False)))


class Client:
    def __init__(
        self, base_url: str = "http://127.0.0.1:8000", *, timeout: float = 30.0, retries: int = 5, backoff: float = 0.1
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retries, self.backoff = retries, backoff
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def models(self) -> list[dict[str, Any]]:
        models: list[dict[str, Any]] = self._json("GET", "/v1/models")["models"]
        return models

    def create(
        self,
        model: str | None = None,
        *,
        session_id: str | None = None,
        ttl_s: int | None = None,
        fork_from: str | None = None,
    ) -> Session:
        body = _create_body(model, session_id, ttl_s, fork_from)
        return Session(self, self._json("POST", "/v1/sessions", json=body))

    def session(self, session_id: str) -> Session:
        """Attach to an existing session (learns its current step)."""
        return Session(self, self._json("GET", f"/v1/sessions/{session_id}"))

    def _step(self, session_id: str, inputs: Mapping[str, Any], step: int) -> StepResult:
        response = self._request(
            "POST",
            f"/v1/sessions/{session_id}/step",
            content=_body(inputs, step),
            headers={"Content-Type": "application/json"},
        )
        return _result(response)

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._request(method, path, **kwargs).json()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(self.retries + 1):
            response, error = None, None
            try:
                response = self.http.request(method, path, **kwargs)
            except httpx.TransportError as e:
                error = e
            if (ok := _checked(response, error, final=attempt == self.retries)) is not None:
                return ok
            time.sleep(_retry_delay(response, attempt, self.backoff))
        raise AssertionError("unreachable")


class AsyncSession:
    def __init__(self, client: AsyncClient, info: Mapping[str, Any]) -> None:
        self.client = client
        self.id: str = info["session_id"]
        self.model: str = info["model"]
        self.step_count: int = int(info["step"])

    async def step(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        result = await self.client._step(self.id, inputs, self.step_count)
        self.step_count = result.step
        return result.outputs

    async def stream(self, chunks: Iterable[Mapping[str, Any]], in_flight: int = 4) -> AsyncIterator[StepResult]:
        from websockets.asyncio.client import connect

        async with connect(_ws_url(self.client.base_url, f"/v1/sessions/{self.id}/stream"), max_size=None) as ws:
            window = _ChunkWindow(chunks, in_flight, await ws.recv())
            while True:
                while (body := window.to_send()) is not None:
                    await ws.send(body)
                if window.done:
                    return
                reply = window.received(await ws.recv())
                self.step_count = reply.step
                yield reply

    async def state(self) -> dict[str, np.ndarray]:
        raw = (await self.client._request("GET", f"/v1/sessions/{self.id}/state")).content
        archive = np.load(io.BytesIO(raw), allow_pickle=False)
        return {k: archive[k] for k in archive.files}

    async def reset(self) -> None:
        await self.client._request("POST", f"/v1/sessions/{self.id}/reset")
        self.step_count = 0

    async def delete(self) -> None:
        await self.client._request("DELETE", f"/v1/sessions/{self.id}")


class AsyncClient:
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
        self.retries, self.backoff = retries, backoff
        self.http = http or httpx.AsyncClient(base_url=self.base_url, timeout=timeout)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()

    async def models(self) -> list[dict[str, Any]]:
        models: list[dict[str, Any]] = (await self._request("GET", "/v1/models")).json()["models"]
        return models

    async def create(
        self,
        model: str | None = None,
        *,
        session_id: str | None = None,
        ttl_s: int | None = None,
        fork_from: str | None = None,
    ) -> AsyncSession:
        body = _create_body(model, session_id, ttl_s, fork_from)
        return AsyncSession(self, (await self._request("POST", "/v1/sessions", json=body)).json())

    async def session(self, session_id: str) -> AsyncSession:
        return AsyncSession(self, (await self._request("GET", f"/v1/sessions/{session_id}")).json())

    async def _step(self, session_id: str, inputs: Mapping[str, Any], step: int) -> StepResult:
        response = await self._request(
            "POST",
            f"/v1/sessions/{session_id}/step",
            content=_body(inputs, step),
            headers={"Content-Type": "application/json"},
        )
        return _result(response)

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(self.retries + 1):
            response, error = None, None
            try:
                response = await self.http.request(method, path, **kwargs)
            except httpx.TransportError as e:
                error = e
            if (ok := _checked(response, error, final=attempt == self.retries)) is not None:
                return ok
            await asyncio.sleep(_retry_delay(response, attempt, self.backoff))
        raise AssertionError("unreachable")
