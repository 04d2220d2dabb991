"""Typed errors of the session engine. Each carries its HTTP status and a machine ``code``; the
transports map them to problem+json / WebSocket messages in one place, never case by case."""

from __future__ import annotations


class CarryoverError(Exception):
    status: int = 500
    code: str = "internal"
    title: str = "Internal error"

    def __init__(self, detail: str, **extra: object) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra

    @property
    def retry_after(self) -> float | None:
        value = self.extra.get("retry_after")
        return float(value) if isinstance(value, int | float) else None


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


class TooManySessions(CarryoverError):
    status, code, title = 429, "too_many_sessions", "Too many sessions"


class Overloaded(CarryoverError):
    status, code, title = 503, "overloaded", "Server overloaded"


class ShuttingDown(CarryoverError):
    status, code, title = 503, "shutting_down", "Server shutting down"


class Unavailable(CarryoverError):
    """The session store cannot be reached; nothing was applied (or, for a write that was cut
    off, retry with ``step`` to learn whether it was)."""

    status, code, title = 503, "store_unavailable", "Session store unavailable"
