"""The one mapping of the error catalogue to the wire: problem bodies, WebSocket messages and
close codes."""

from __future__ import annotations

import json

import pytest

from service.api.problems import (
    CLOSE_INTERNAL,
    CLOSE_TOO_BIG,
    CLOSE_TRY_AGAIN,
    error_problem,
    ws_close_code,
    ws_error_message,
    ws_setup_close_code,
)
from service.errors import (
    CarryoverError,
    InvalidInput,
    ModelNotFound,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    SessionCorrupt,
    SessionNotFound,
    ShuttingDown,
    StepConflict,
    StoreUnavailable,
)


def test_problem_bodies_carry_the_error_extras() -> None:
    body = error_problem(StepConflict("the session is at step 3, not 1", current_step=3), "rid")
    assert body == {
        "type": "https://carryover.dev/problems/step_conflict",
        "title": "Step conflict",
        "status": 409,
        "detail": "the session is at step 3, not 1",
        "code": "step_conflict",
        "request_id": "rid",
        "current_step": 3,
    }


def test_websocket_error_messages_rename_type_and_echo_the_id() -> None:
    message = json.loads(ws_error_message(StoreUnavailable("down", retry_after=2.0), chunk_id=7))
    assert message["type"] == "error" and message["problem_type"].endswith("/store_unavailable")
    assert (message["status"], message["code"], message["retry_after"], message["id"]) == (
        503,
        "store_unavailable",
        2.0,
        7,
    )
    assert "id" not in json.loads(ws_error_message(InvalidInput("bad")))


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidInput("bad"), None),
        (StepConflict("stale"), None),
        (PayloadTooLarge("big"), CLOSE_TOO_BIG),
        (SessionNotFound("gone"), 4404),
        (Overloaded("full"), CLOSE_TRY_AGAIN),
        (ShuttingDown("bye"), CLOSE_TRY_AGAIN),
        (StoreUnavailable("down"), CLOSE_TRY_AGAIN),
        (NotReady("starting"), CLOSE_TRY_AGAIN),
        (SessionCorrupt("bytes"), CLOSE_INTERNAL),
        (CarryoverError("bug"), CLOSE_INTERNAL),
    ],
)
def test_close_codes(error: CarryoverError, code: int | None) -> None:
    assert ws_close_code(error) == code


def test_a_session_that_cannot_be_opened_always_closes() -> None:
    assert ws_setup_close_code(ModelNotFound("nope")) == 4404
    assert ws_setup_close_code(InvalidInput("bad ttl")) == 4422
    assert ws_setup_close_code(StoreUnavailable("down")) == CLOSE_TRY_AGAIN
