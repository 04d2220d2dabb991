"""The verdict on one request's loaded record (pure: no Redis, no model)."""

from __future__ import annotations

import asyncio

import numpy as np

from service.engine.admission import admission, replay_copy, replayed
from service.engine.batch import StepReply, StepRequest
from service.engine.tensors import pack_arrays
from service.errors import ModelMismatch, SessionCorrupt, SessionNotFound, StepConflict
from service.store.store import SessionRecord


def request(expected_step: int | None = None, owner: str = "alice", digest: str = "d") -> StepRequest:
    future: asyncio.Future[StepReply] = asyncio.Future(loop=asyncio.new_event_loop())
    return StepRequest("s", owner, [{"x": np.zeros((3, 1), np.float32)}], expected_step, digest, future)


def record(step: int = 5, owner: str = "alice", **fields: object) -> SessionRecord:
    base: dict[str, object] = dict(model="m", fingerprint="f", revision=2, states=(b"",), created_at=0.0)
    base.update(updated_at=0.0, ttl_s=60, last_digest="d")
    base.update(fields)
    return SessionRecord("s", step=step, owner=owner, **base)  # type: ignore[arg-type]


def test_each_record_gets_its_verdict() -> None:
    assert admission(request(), record(), "m", "f") == "apply"
    assert admission(request(5), record(5), "m", "f") == "apply"
    assert admission(request(2), record(5), "m", "f") == "replay"  # 2 + 3 steps = 5, same digest
    assert isinstance(admission(request(2, digest="other"), record(5), "m", "f"), StepConflict)
    assert isinstance(admission(request(4), record(5), "m", "f"), StepConflict)
    assert isinstance(admission(request(), None, "m", "f"), SessionNotFound)
    assert isinstance(admission(request(owner="bob"), record(), "m", "f"), SessionNotFound)  # never 403
    assert isinstance(admission(request(), record(), "m", "g"), ModelMismatch)
    assert isinstance(admission(request(), record(), "other", "f"), ModelMismatch)
    corrupt = SessionCorrupt("garbage")
    assert admission(request(), corrupt, "m", "f") is corrupt


def test_a_replay_answers_the_stored_outputs_or_a_conflict_naming_the_step() -> None:
    outputs = {"y": np.arange(3, dtype=np.float32)}
    reply = replayed(request(2), record(5, last_reply=pack_arrays(outputs)))
    assert isinstance(reply, StepReply) and reply.replay and reply.step == 5
    np.testing.assert_array_equal(reply.outputs["y"], outputs["y"])
    gone = replayed(request(2), record(5))  # past the window or over the cap: no copy kept
    assert isinstance(gone, StepConflict) and gone.extra["current_step"] == 5
    assert isinstance(replayed(request(2), record(5, last_digest="new")), StepConflict)


def test_only_requests_with_step_keep_a_bounded_replay_copy() -> None:
    outputs = {"y": np.zeros(10, np.float32)}
    assert replay_copy(request(None), outputs, 1 << 20) == b""
    assert replay_copy(request(0), outputs, 39) == b""
    assert replay_copy(request(0), outputs, 40) == pack_arrays(outputs)
