"""The one error catalogue. Request errors derive from ``CarryoverError`` and carry their HTTP
status and a machine ``code``; ``service/api/problems.py`` maps them, in one place, to
problem+json, WebSocket messages / close codes and ``/v2`` errors. Start-up errors (a model that
breaks the contract, an embedded Redis that cannot start) are plain exceptions for the CLI."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar


class CarryoverError(Exception):
    status: int = 500
    code: str = "internal"
    title: str = "Internal error"
    headers: ClassVar[Mapping[str, str]] = {}  # extra HTTP headers of the problem response

    def __init__(self, detail: str, **extra: object) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra

    @property
    def retry_after(self) -> float | None:
        value = self.extra.get("retry_after")
        return float(value) if isinstance(value, int | float) else None


class InvalidJson(CarryoverError):
    """The body (or WebSocket message) is not valid JSON."""

    status, code, title = 400, "invalid_json", "Malformed JSON"


class UnsupportedMediaType(CarryoverError):
    status, code, title = 415, "unsupported_media_type", "Unsupported media type"


class InvalidInput(CarryoverError):
    status, code, title = 422, "invalid_input", "Invalid input"


class PayloadTooLarge(CarryoverError):
    status, code, title = 413, "payload_too_large", "Payload too large"


class SessionNotFound(CarryoverError):
    status, code, title = 404, "session_not_found", "Session not found"


class ModelNotFound(CarryoverError):
    status, code, title = 404, "model_not_found", "Model not found"


class SessionExists(CarryoverError):
    status, code, title = 409, "session_exists", "Session already exists"


class StepConflict(CarryoverError):
    """The client's ``step`` is neither the current step nor a replay of the last request."""

    status, code, title = 409, "step_conflict", "Step conflict"


class ModelMismatch(CarryoverError):
    """State written by a model with another fingerprint."""

    status, code, title = 409, "model_mismatch", "State belongs to another model"


class Unauthorized(CarryoverError):
    """No API key, or one the server does not know (only when API keys are configured)."""

    status, code, title = 401, "unauthorized", "Unauthorized"
    headers: ClassVar[Mapping[str, str]] = {"WWW-Authenticate": "Bearer"}


class TooManySessions(CarryoverError):
    """The server's, or the API key's, limit of live sessions is reached."""

    status, code, title = 429, "too_many_sessions", "Too many sessions"

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message, retry_after=retry_after)


class RateLimited(CarryoverError):
    """The API key's requests per second are used up; ``retry_after`` says when a token is back."""

    status, code, title = 429, "rate_limited", "Too many requests"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message, retry_after=retry_after)


class TooManyStreams(CarryoverError):
    """The API key holds its limit of open WebSocket connections."""

    status, code, title = 429, "too_many_streams", "Too many WebSocket connections"

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message, retry_after=retry_after)


class SessionCorrupt(CarryoverError):
    """The session's stored record cannot be decoded (corrupt, foreign or truncated bytes). Only
    that session's requests fail; the rest of their batch is answered."""

    status, code, title = 500, "session_corrupt", "Session record unreadable"


class Overloaded(CarryoverError):
    status, code, title = 503, "overloaded", "Server overloaded"


class ShuttingDown(CarryoverError):
    status, code, title = 503, "shutting_down", "Server shutting down"


class Unavailable(CarryoverError):
    """The session store cannot be reached; nothing was applied (or, for a write that was cut
    off, retry with ``step`` to learn whether it was)."""

    status, code, title = 503, "store_unavailable", "Session store unavailable"


class StoreUnavailable(Unavailable):
    """Redis down / timing out / loading: the 503 (with Retry-After) that reaches every transport
    unchanged."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message, retry_after=retry_after)


class StoreFull(StoreUnavailable):
    """Redis refused a write because it reached ``maxmemory`` (policy ``noeviction``): nothing
    was written, stored sessions are kept; writes fail until memory is freed or raised."""

    status, code, title = 507, "store_full", "Session store full"


class IdleTimeout(CarryoverError):
    """A WebSocket sent nothing for ``ws_idle_timeout_s`` while no chunk was in flight."""

    status, code, title = 408, "idle_timeout", "Connection idle"


class NotReady(CarryoverError):
    """Models still loading or the store not connected yet (or shutting down): readiness fails."""

    status, code, title = 503, "not_ready", "Not ready"


# -- start-up errors (not request errors) ---------------------------------------------------------


class ModelContractError(ValueError):
    """A model (or its metadata) breaks the contract. The message names the tensor at fault."""


class EmbeddedRedisError(RuntimeError):
    """The embedded Redis could not be started (no binary, data dir in use, failed to come up)."""


class StartupError(RuntimeError):
    """``carryover serve`` cannot start: port in use, Redis unreachable, a model file missing or
    unloadable, a worker that failed to start. The message says which, in one line."""


class UnknownSetting(ValueError):
    """A ``CARRYOVER_*`` environment variable names no setting (a typo would otherwise be ignored
    silently). The message names the closest real setting."""
