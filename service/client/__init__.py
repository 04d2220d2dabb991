"""Python client for carryover: sync (``Client``) and async (``AsyncClient``), thin shells around
one sans-IO core (``core.py``: requests, reply parsing, retry decisions, stream pipelining).

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

from service.client.aio import AsyncClient, AsyncSession
from service.client.core import (
    RETRYABLE_STATUS,
    CarryoverClientError,
    GeneratedToken,
    GenerationDone,
    GenerationEvent,
    RetryPolicy,
    StepResult,
)
from service.client.sync import Client, Session

__all__ = [
    "RETRYABLE_STATUS",
    "AsyncClient",
    "AsyncSession",
    "CarryoverClientError",
    "Client",
    "GeneratedToken",
    "GenerationDone",
    "GenerationEvent",
    "RetryPolicy",
    "Session",
    "StepResult",
]
