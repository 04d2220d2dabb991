"""The sans-IO client core: requests, reply parsing, retry decisions, the stream window.
Pure unit tests: replies are real ``httpx.Response`` objects, nothing is sent."""

from __future__ import annotations

import inspect
import io
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from service.client import (
    AsyncClient,
    AsyncSession,
    CarryoverClientError,
    Client,
    GeneratedToken,
    GenerationDone,
    Session,
)
from service.client.core import (
    ChunkWindow,
    RetryPolicy,
    SessionCore,
    create_call,
    models_call,
    ws_url,
)


def reply(status: int = 200, body: Any = None, headers: dict[str, str] | None = None) -> httpx.Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body if body is not None else {})
    return httpx.Response(status, content=content, headers=headers)


def problem(status: int, code: str, detail: str) -> httpx.Response:
    body = {"status": status, "code": code, "detail": detail}
    return reply(status, body, {"Content-Type": "application/problem+json"})


def session(step: int = 0) -> SessionCore:
    return SessionCore({"session_id": "s1", "model": "gru", "step": step})


def test_a_success_is_returned_as_is() -> None:
    ok = reply(200, {"models": []})
    assert RetryPolicy().outcome(0, ok) is ok
    empty = RetryPolicy(retries=0).outcome(0, reply(204, b""))
    assert isinstance(empty, httpx.Response) and empty.status_code == 204


def test_retryable_replies_wait_for_retry_after_or_back_off() -> None:
    policy = RetryPolicy(retries=10, backoff=0.1)
    assert policy.outcome(0, problem(503, "overloaded", "busy")) == pytest.approx(0.1)
    assert policy.outcome(3, reply(502, b"bad gateway")) == pytest.approx(0.8)
    assert policy.outcome(9, reply(504, b"")) == 5.0  # backoff capped
    assert policy.outcome(0, reply(503, {}, {"Retry-After": "2"})) == 2.0
    assert policy.outcome(0, reply(503, {}, {"Retry-After": "3600"})) == 30.0  # capped
    assert policy.outcome(1, reply(503, {}, {"Retry-After": "soon"})) == pytest.approx(0.2)  # unparsable: backoff
    assert policy.outcome(2, None, httpx.ReadTimeout("lost")) == pytest.approx(0.4)  # transport failure


def test_final_and_non_retryable_errors_raise_typed_errors() -> None:
    policy = RetryPolicy(retries=2)
    with pytest.raises(CarryoverClientError) as info:
        policy.outcome(0, problem(409, "step_conflict", "at step 3"))  # never retried
    assert (info.value.status, info.value.code, info.value.detail) == (409, "step_conflict", "at step 3")
    assert info.value.body["status"] == 409
    with pytest.raises(CarryoverClientError) as info:
        policy.outcome(2, problem(503, "store_unavailable", "redis down"))  # out of retries
    assert info.value.code == "store_unavailable"
    with pytest.raises(CarryoverClientError) as info:
        policy.outcome(2, None, httpx.ConnectError("refused"))
    assert (info.value.status, info.value.code, info.value.detail) == (0, "transport", "refused")
    with pytest.raises(CarryoverClientError) as info:
        policy.outcome(0, reply(404, b"<html>not here</html>"))  # not problem+json
    assert (info.value.code, info.value.detail) == ("http_error", "<html>not here</html>")


def test_a_step_carries_the_known_step_and_updates_it() -> None:
    core = session(step=5)
    call = core.step_call({"x": np.ones((2, 4), np.float32)})
    request = call.request
    assert (request.method, request.path, request.headers) == (
        "POST",
        "/v1/sessions/s1/step",
        {"Content-Type": "application/json"},
    )
    assert orjson.loads(request.content or b"") == {"inputs": {"x": [[1.0] * 4] * 2}, "step": 5}
    # a retry sends this same request (same step) again: nothing in it depends on the attempt
    outputs = call.parse(reply(200, {"step": 7, "outputs": {"y": [[1, 2, 3], [4, 5, 6]]}}))
    assert core.step_count == 7 and outputs["y"].dtype == np.float32 and outputs["y"].shape == (2, 3)
    assert orjson.loads(core.step_call({"x": [[0.0] * 4]}).request.content or b"")["step"] == 7


def test_session_calls() -> None:
    core = session(step=3)
    assert core.info_call().request.path == "/v1/sessions/s1"
    assert core.info_call().parse(reply(200, {"session_id": "s1", "step": 9}))["step"] == 9
    assert core.step_count == 9
    load = core.load_state_call(b"npz bytes")
    assert (load.request.method, load.request.content) == ("PUT", b"npz bytes")
    assert load.request.headers == {"Content-Type": "application/x-npz"}
    load.parse(reply(200, {"step": 4}))
    assert core.step_count == 4
    buffer = io.BytesIO()
    np.savez(buffer, h0=np.arange(3, dtype=np.float32), carryover_step=np.int64(4))
    state = core.state_call().parse(reply(200, buffer.getvalue()))
    assert state["h0"].tolist() == [0, 1, 2] and int(state["carryover_step"]) == 4
    reset = core.reset_call()
    assert (reset.request.method, reset.request.path) == ("POST", "/v1/sessions/s1/reset")
    reset.parse(reply(200))
    assert core.step_count == 0
    assert core.delete_call().request.method == "DELETE"
    assert core.stream_url("https://h:1/") == "wss://h:1/v1/sessions/s1/stream"


def test_client_calls() -> None:
    create = create_call("gru", None, 60, None)
    assert (create.request.method, create.request.path) == ("POST", "/v1/sessions")
    assert orjson.loads(create.request.content or b"") == {"model": "gru", "ttl_s": 60}  # unset fields left out
    assert models_call().parse(reply(200, {"models": [{"name": "gru"}]})) == [{"name": "gru"}]
    assert ws_url("http://a:8000", "/v1/stream") == "ws://a:8000/v1/stream"


def test_stream_window_pipelines_with_steps_and_keeps_order() -> None:
    core = session()
    chunks = [{"tokens": [1, 2]}, {"tokens": [3, 4, 5]}, {"tokens": [6]}]
    window = ChunkWindow(core, chunks, 2, orjson.dumps({"type": "session", "step": 5}))
    sent = [window.to_send(), window.to_send(), window.to_send()]
    assert [orjson.loads(s)["step"] for s in sent[:2] if s] == [5, 7] and sent[2] is None  # window full
    result = window.received(orjson.dumps({"type": "result", "step": 7, "outputs": {"logits": [[0.5], [1.5]]}}))
    assert result.step == 7 and core.step_count == 7 and not window.done
    last = window.to_send()
    assert last is not None and orjson.loads(last)["step"] == 10
    assert window.to_send() is None and not window.done  # full again: two replies pending
    window.received(orjson.dumps({"type": "result", "step": 10, "outputs": {"logits": [[0]] * 3}, "replay": True}))
    with pytest.raises(CarryoverClientError) as info:
        window.received(orjson.dumps({"type": "error", "status": 422, "code": "invalid_input", "detail": "bad"}))
    assert (info.value.status, info.value.code) == (422, "invalid_input")
    assert not window.done and window.to_send() is None  # no chunk left: now the stream is done
    assert window.done


def test_an_error_instead_of_the_session_message_raises() -> None:
    hello = orjson.dumps({"type": "error", "status": 404, "code": "session_not_found", "detail": "gone"})
    with pytest.raises(CarryoverClientError) as info:
        ChunkWindow(session(), [], 1, hello)
    assert info.value.status == 404


def public(cls: type) -> dict[str, list[str]]:
    names = {n for n in dir(cls) if not n.startswith("_") and callable(getattr(cls, n))}
    return {n: list(inspect.signature(getattr(cls, n)).parameters) for n in sorted(names)}


def test_both_shells_have_the_same_methods() -> None:
    assert public(Session) == public(AsyncSession)
    assert public(Client) == public(AsyncClient)
    assert {"info", "load_state", "state", "step", "stream", "generate", "reset", "delete"} <= set(public(AsyncSession))
    assert all(inspect.iscoroutinefunction(getattr(AsyncClient, n)) for n in ("models", "create", "session", "call"))


def test_generation_request_and_events() -> None:
    core = session(step=4)
    request = core.generate_request("ab", max_tokens=3, temperature=0.0, seed=7)
    assert (request.method, request.path, request.headers["Accept"]) == (
        "POST",
        "/v1/sessions/s1/generate",
        "text/event-stream",
    )
    assert orjson.loads(request.content or b"") == {
        "prompt": "ab",
        "max_tokens": 3,
        "temperature": 0.0,
        "seed": 7,
        "step": 4,
    }
    assert orjson.loads(core.generate_request([1, 2], max_tokens=1, temperature=1.0).content or b"")["prompt"] == [1, 2]
    token = core.generation_event("message", '{"token": 3, "text": "d", "step": 7}')
    assert token == GeneratedToken(3, "d", 7) and core.step_count == 7
    done = core.generation_event("done", '{"step": 8, "tokens": [3, 1], "text": "db", "finish_reason": "length"}')
    assert done == GenerationDone(8, [3, 1], "db", "length") and core.step_count == 8
    assert core.generation_event("ping", "") is None
    with pytest.raises(CarryoverClientError) as info:
        core.generation_event("error", '{"status": 503, "code": "overloaded", "detail": "busy"}')
    assert (info.value.status, info.value.code) == (503, "overloaded")
