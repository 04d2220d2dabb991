"""The sans-IO core of the client: what to send, how to read the reply, whether to retry.

No sockets here. Every operation is a :class:`Call`: a :class:`Request` plus the function that
turns the server's reply into a typed result (updating what the session object knows, e.g. its
step count). The sync and async shells (``sync.py``, ``aio.py``) only send requests, sleep
between retries and move WebSocket messages; so both behave alike by construction.

Exactly-once stepping: a step request carries the step count the client believes the session is
at (``"step": n``), and a retry resends the very same request. If an earlier attempt had landed,
the server answers from its replay record (``Idempotent-Replay: true``) instead of applying it
twice.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import orjson

RETRYABLE_STATUS = frozenset({502, 503, 504})
MAX_RETRY_AFTER_S = 30.0
MAX_BACKOFF_S = 5.0
JSON = {"Content-Type": "application/json"}
NPZ = {"Content-Type": "application/x-npz"}
SSE = {"Content-Type": "application/json", "Accept": "text/event-stream"}

T_co = TypeVar("T_co", covariant=True)
R = TypeVar("R", bound="Reply")


class CarryoverClientError(Exception):
    """A problem+json error from the server (or a transport failure after all retries: status 0,
    code ``transport``)."""

    def __init__(self, status: int, code: str, detail: str, body: Mapping[str, Any] | None = None) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status, self.code, self.detail = status, code, detail
        self.body = dict(body or {})

    @classmethod
    def from_reply(cls, reply: Reply) -> CarryoverClientError:
        """The error an HTTP error reply stands for (its problem+json fields when it has them)."""
        try:
            body = orjson.loads(reply.content)
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            body = {}
        detail = body.get("detail", reply.content.decode("utf-8", "replace"))
        return cls(reply.status_code, str(body.get("code", "http_error")), str(detail), body)

    @classmethod
    def from_message(cls, message: Mapping[str, Any]) -> CarryoverClientError:
        """The error of a WebSocket ``{"type": "error", ...}`` message."""
        return cls(int(message.get("status", 0)), str(message.get("code")), str(message.get("detail")), message)


class Reply(Protocol):
    """What the core reads of an HTTP response (``httpx.Response`` is one)."""

    @property
    def status_code(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    @property
    def content(self) -> bytes: ...


@dataclass(frozen=True)
class Request:
    """One HTTP request, relative to the client's base URL."""

    method: str
    path: str
    content: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Call(Generic[T_co]):
    """A request and the parser of its successful reply."""

    request: Request
    parse: Callable[[Reply], T_co]


@dataclass
class StepResult:
    step: int
    outputs: dict[str, np.ndarray]
    replay: bool = False


@dataclass(frozen=True)
class RetryPolicy:
    """Retries after a transport failure or a 502/503/504, resending the same request.

    ``retries`` is the number of retries after the first attempt; the wait is the server's
    ``Retry-After`` (capped at 30 s) or exponential backoff from ``backoff`` (capped at 5 s)."""

    retries: int = 5
    backoff: float = 0.1

    def outcome(self, attempt: int, reply: R | None, error: Exception | None = None) -> R | float:
        """Attempt ``attempt`` (0-based) gave ``reply`` or failed with ``error``: the reply when it
        is a success, else the seconds to wait before retrying. Raises
        :class:`CarryoverClientError` when the error is final (not retryable, or no retries left)."""
        final = attempt >= self.retries
        if reply is not None:
            if reply.status_code < 400:
                return reply
            if reply.status_code not in RETRYABLE_STATUS or final:
                raise CarryoverClientError.from_reply(reply)
            if (after := _retry_after(reply)) is not None:
                return after
        elif final:
            raise CarryoverClientError(0, "transport", str(error)) from error
        return float(min(self.backoff * 2**attempt, MAX_BACKOFF_S))


def _retry_after(reply: Reply) -> float | None:
    try:
        return min(float(reply.headers["Retry-After"]), MAX_RETRY_AFTER_S)
    except (KeyError, ValueError):
        return None


def step_body(inputs: Mapping[str, Any], step: int | None) -> bytes:
    """The JSON body of a step (HTTP) or a chunk (WebSocket); numpy arrays are fine."""
    payload: dict[str, Any] = {"inputs": dict(inputs)}
    if step is not None:
        payload["step"] = step
    return orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)


def steps_of(inputs: Mapping[str, Any]) -> int:
    """T of a request: the leading axis of its (first) input."""
    return len(next(iter(inputs.values())))


def parse_json(reply: Reply) -> Any:
    return orjson.loads(reply.content)


def _outputs(data: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, dtype=np.float32) for k, v in data["outputs"].items()}


def parse_step(reply: Reply) -> StepResult:
    """The result of an HTTP step (``replay`` when the server answered from its replay record)."""
    data = parse_json(reply)
    return StepResult(int(data["step"]), _outputs(data), reply.headers.get("Idempotent-Replay") == "true")


def parse_npz(reply: Reply) -> dict[str, np.ndarray]:
    """A state export: one array per state tensor, plus ``carryover_*`` metadata arrays."""
    archive = np.load(io.BytesIO(reply.content), allow_pickle=False)
    return {k: archive[k] for k in archive.files}


@dataclass(frozen=True)
class GeneratedToken:
    """One token of a server-side generation; ``step`` is the session's step count after it."""

    token: int
    text: str
    step: int


@dataclass(frozen=True)
class GenerationDone:
    """The end of a generation: every token, their text, and why it stopped (``length``,
    ``stop`` or ``cancelled``)."""

    step: int
    tokens: list[int]
    text: str
    finish_reason: str


GenerationEvent = GeneratedToken | GenerationDone


def generate_body(
    prompt: str | Sequence[int],
    step: int | None,
    *,
    max_tokens: int,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: Sequence[str] | None = None,
) -> bytes:
    """The JSON body of ``POST /v1/sessions/{id}/generate`` (unset options left to the server)."""
    body: dict[str, Any] = {
        "prompt": prompt if isinstance(prompt, str) else [int(t) for t in prompt],
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "seed": seed,
        "stop": list(stop) if stop is not None else None,
        "step": step,
    }
    return orjson.dumps({k: v for k, v in body.items() if v is not None})


def parse_generation_event(event: str, data: str) -> GenerationEvent | None:
    """One server-sent event of a generation: a token (the default ``message`` event), ``done``,
    or ``error`` (raises :class:`CarryoverClientError` with its problem fields); others: None."""
    if event not in {"message", "done", "error"}:
        return None  # e.g. a keep-alive comment the server may add
    payload: dict[str, Any] = orjson.loads(data)
    if event == "error":
        raise CarryoverClientError.from_message(payload)
    if event == "done":
        tokens = [int(t) for t in payload["tokens"]]
        return GenerationDone(int(payload["step"]), tokens, str(payload["text"]), str(payload["finish_reason"]))
    return GeneratedToken(int(payload["token"]), str(payload["text"]), int(payload["step"]))


def parse_message(raw: str | bytes) -> dict[str, Any]:
    """A JSON WebSocket message; an error message raises :class:`CarryoverClientError`."""
    message: dict[str, Any] = orjson.loads(raw)
    if message.get("type") == "error":
        raise CarryoverClientError.from_message(message)
    return message


def ws_url(base_url: str, path: str) -> str:
    return base_url.replace("http://", "ws://", 1).replace("https://", "wss://", 1).rstrip("/") + path


# -- calls ----------------------------------------------------------------------------------------


def models_call() -> Call[list[dict[str, Any]]]:
    return Call(Request("GET", "/v1/models"), lambda r: list(parse_json(r)["models"]))


def create_call(
    model: str | None,
    session_id: str | None,
    ttl_s: int | None,
    fork_from: str | None,
    constants: Mapping[str, Any] | None = None,
) -> Call[dict[str, Any]]:
    body = {"model": model, "session_id": session_id, "ttl_s": ttl_s, "fork_from": fork_from, "constants": constants}
    content = orjson.dumps({k: v for k, v in body.items() if v is not None}, option=orjson.OPT_SERIALIZE_NUMPY)
    return Call(Request("POST", "/v1/sessions", content, JSON), parse_json)


def session_call(session_id: str) -> Call[dict[str, Any]]:
    return Call(Request("GET", f"/v1/sessions/{session_id}"), parse_json)


class SessionCore:
    """What the client knows of one server session (``id``, ``model``, ``step_count``: the last
    known step count) and the calls that act on it. Parsing a call's reply updates
    ``step_count``; the shells subclass this and add the sending."""

    def __init__(self, info: Mapping[str, Any]) -> None:
        self.id: str = info["session_id"]
        self.model: str = info["model"]
        self.step_count: int = int(info["step"])

    @property
    def path(self) -> str:
        return f"/v1/sessions/{self.id}"

    def step_call(self, inputs: Mapping[str, Any]) -> Call[dict[str, np.ndarray]]:
        """One request (leading T axis), exactly once: it carries the current ``step``."""

        def parse(reply: Reply) -> dict[str, np.ndarray]:
            result = parse_step(reply)
            self.step_count = result.step
            return result.outputs

        return Call(Request("POST", f"{self.path}/step", step_body(inputs, self.step_count), JSON), parse)

    def generate_request(self, prompt: str | Sequence[int] = "", **options: Any) -> Request:
        """A server-side generation (token LMs), answered with server-sent events. It carries the
        current ``step``, so it starts only from the state this client last saw (else 409, before
        any token). Not retried: it advances the session as it streams."""
        return Request("POST", f"{self.path}/generate", generate_body(prompt, self.step_count, **options), SSE)

    def generation_event(self, event: str, data: str) -> GenerationEvent | None:
        """Parse one event of :meth:`generate_request`'s stream, following the step count."""
        parsed = parse_generation_event(event, data)
        if parsed is not None:
            self.step_count = parsed.step
        return parsed

    def info_call(self) -> Call[dict[str, Any]]:
        def parse(reply: Reply) -> dict[str, Any]:
            data: dict[str, Any] = parse_json(reply)
            self.step_count = int(data["step"])
            return data

        return Call(Request("GET", self.path), parse)

    def state_call(self) -> Call[dict[str, np.ndarray]]:
        return Call(Request("GET", f"{self.path}/state"), parse_npz)

    def load_state_call(self, npz_bytes: bytes) -> Call[None]:
        """Import a state (an ``.npz`` as exported by :meth:`state_call`); the step count follows it."""

        def parse(reply: Reply) -> None:
            self.step_count = int(parse_json(reply)["step"])

        return Call(Request("PUT", f"{self.path}/state", npz_bytes, NPZ), parse)

    def reset_call(self) -> Call[None]:
        def parse(reply: Reply) -> None:
            self.step_count = 0

        return Call(Request("POST", f"{self.path}/reset"), parse)

    def delete_call(self) -> Call[None]:
        return Call(Request("DELETE", self.path), lambda reply: None)

    def stream_url(self, base_url: str) -> str:
        return ws_url(base_url, f"{self.path}/stream")

    def window(self, chunks: Iterable[Mapping[str, Any]], in_flight: int, hello: str | bytes) -> ChunkWindow:
        """The pipelining of a stream, once the server's first message ``hello`` arrived."""
        return ChunkWindow(self, chunks, in_flight, hello)


class ChunkWindow:
    """The pipelining of ``stream()``: at most ``in_flight`` chunks unanswered; each chunk carries
    the ``step`` the session will be at when it applies, so a chunk is never applied twice."""

    def __init__(
        self, session: SessionCore, chunks: Iterable[Mapping[str, Any]], in_flight: int, hello: str | bytes
    ) -> None:
        self.session = session
        self.chunks = iter(chunks)
        self.in_flight = in_flight
        self.expected = int(parse_message(hello)["step"])
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
        body = step_body(chunk, self.expected).decode()
        self.expected += steps_of(chunk)
        self.pending += 1
        return body

    @property
    def done(self) -> bool:
        return self.exhausted and self.pending == 0

    def received(self, raw: str | bytes) -> StepResult:
        """The reply to the oldest unanswered chunk."""
        self.pending -= 1
        message = parse_message(raw)
        result = StepResult(int(message["step"]), _outputs(message), bool(message.get("replay", False)))
        self.session.step_count = result.step
        return result
