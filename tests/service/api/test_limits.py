"""Every resource limit is a setting, and each holds with a clear 4xx or close code: body size,
steps per request, WebSocket message size, idle timeout, chunks in flight, session count, and the
one session id rule. (The queue length is ``test_http.py::test_limits_sessions_and_queue`` and,
for WebSockets, ``test_ws.py::test_overload_and_redis_outage_close_1013_never_1011``.)"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from service.api.state import app_state
from service.config import Settings
from service.engine.model import RecurrentModel
from tests.live_server import LiveServer, live_server
from tests.redis_fixture import RedisServer
from tests.service.api.test_http import assert_problem, create, db_url
from tests.service.api.test_ws import assert_problem as assert_ws_problem
from tests.service.api.test_ws import chunk_frame, close_code, open_stream, recv, recv_json

LIMITS: dict[str, Any] = {
    "max_body_bytes": 64 * 1024,
    "ws_max_message_bytes": 4096,
    "max_steps_per_request": 50,
    "ws_max_in_flight": 2,
    "ws_idle_timeout_s": 1.0,
}


@pytest.fixture(scope="module")
def limited(redis_server: RedisServer, loaded: dict[str, RecurrentModel]) -> Iterator[LiveServer]:
    with live_server(db_url(redis_server, 5), {"gru": loaded["gru_stacked"]}, **LIMITS) as server:
        yield server


@pytest.fixture
async def client(limited: LiveServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=limited.url, timeout=30) as c:
        yield c


def x(steps: int) -> list[list[float]]:
    return np.full((steps, 4), 0.25, np.float32).tolist()


def test_every_limit_is_a_setting() -> None:
    for name in (*LIMITS, "max_queue", "max_sessions", "max_chunk"):
        assert Settings.model_fields[name].description, name
    assert Settings(max_body_bytes=9999).ws_message_limit == 9999  # unset: the body limit
    assert Settings(max_body_bytes=9999, ws_max_message_bytes=2048).ws_message_limit == 2048


async def test_body_limit_is_413_and_the_session_is_untouched(client: httpx.AsyncClient) -> None:
    sid = await create(client)
    r = await client.post(f"/v1/sessions/{sid}/step", content=b"[" * (64 * 1024 + 1))
    assert_problem(r, 413, "payload_too_large", str(64 * 1024), "max_body_bytes")
    assert (await client.get(f"/v1/sessions/{sid}")).json()["step"] == 0


async def test_steps_per_request_over_http_and_websocket(client: httpx.AsyncClient, limited: LiveServer) -> None:
    sid = await create(client)
    r = await client.post(f"/v1/sessions/{sid}/step", json={"inputs": {"x": x(51)}})
    assert_problem(r, 422, "invalid_input", "51 timesteps", "50")
    assert (await client.post(f"/v1/sessions/{sid}/step", json={"inputs": {"x": x(50)}})).json()["step"] == 50
    ws, _ = await open_stream(limited, f"/v1/sessions/{sid}/stream")
    await ws.send(np.zeros((51, 4), "<f4").tobytes())  # 816 bytes: under the message limit, over T
    assert_ws_problem(await recv_json(ws), 422, "invalid_input")
    await ws.send(chunk_frame("x", np.zeros((2, 4), np.float32), binary=False))
    assert (await recv_json(ws))["step"] == 52  # an error that ends nothing
    await ws.close()


async def test_websocket_message_limit_is_its_own_setting(client: httpx.AsyncClient, limited: LiveServer) -> None:
    frame = chunk_frame("x", np.full((250, 4), 0.5, np.float32), binary=False)
    assert 4096 < len(frame) < 4096 + 1024  # uvicorn's own cut is 1 KiB above: the app answers first
    ws, hello = await open_stream(limited, "/v1/stream")
    await ws.send(frame)
    message = await recv_json(ws)
    assert_ws_problem(message, 413, "payload_too_large")
    assert "4096" in message["detail"] and "ws_max_message_bytes" in message["detail"]
    assert await close_code(ws) == 1009
    r = await client.post(f"/v1/sessions/{hello['session_id']}/step", content=frame)  # HTTP has its own limit
    assert r.status_code == 422 and "50" in r.json()["detail"]  # (250 steps: over T, not over bytes)


async def test_an_idle_websocket_is_closed_4408(limited: LiveServer) -> None:
    ws, _ = await open_stream(limited, "/v1/stream")
    for _ in range(3):  # a client that keeps talking is never idle
        await asyncio.sleep(0.5)
        await ws.send(chunk_frame("x", np.zeros((1, 4), np.float32), binary=True))
        await recv(ws)
    message = await recv_json(ws)  # then silence: closed after ws_idle_timeout_s
    assert_ws_problem(message, 408, "idle_timeout")
    assert "ws_idle_timeout_s" in message["detail"]
    assert await close_code(ws) == 4408


async def test_a_chunk_in_flight_past_the_idle_timeout_is_not_idleness(
    limited: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client waiting for a slow chunk's reply is not idle: the reply comes, and only the
    silence after it closes the connection (the idle watchdog looks again a timeout later)."""
    scheduler = app_state(limited.app).session_service().schedulers["gru"]
    original = scheduler.device.run

    def slow(batch: Any, tiny: bool) -> Any:  # in the device thread: 20 cells > inline
        time.sleep(1.6)  # past ws_idle_timeout_s (1 s)
        return original(batch, tiny)

    monkeypatch.setattr(scheduler.device, "run", slow)
    ws, _ = await open_stream(limited, "/v1/stream")
    started = time.monotonic()
    await ws.send(chunk_frame("x", np.zeros((20, 4), np.float32), binary=True))
    reply = await recv(ws)
    assert isinstance(reply, bytes) and time.monotonic() - started >= 1.6  # the result, not a 4408
    message = await recv_json(ws)
    assert_ws_problem(message, 408, "idle_timeout")
    # Busy at the first look (1 s), idle at the next (2 s): not closed as soon as the reply went.
    assert time.monotonic() - started >= 1.9
    assert await close_code(ws) == 4408


async def test_chunks_in_flight_per_connection_are_bounded(limited: LiveServer) -> None:
    ws, hello = await open_stream(limited, "/v1/stream")
    streams: list[Any] = list(app_state(limited.app).streams)  # the connections, beyond the drain's view
    connection = next(c for c in streams if c.session_id == hello["session_id"])
    seen: list[int] = []

    async def sample() -> None:
        while True:
            seen.append(len(connection.steps))
            await asyncio.sleep(0.001)

    sampler = asyncio.create_task(sample())
    frames = [chunk_frame("x", np.full((40, 4), i, np.float32), binary=True) for i in range(30)]
    await asyncio.gather(*(ws.send(f) for f in frames))  # all at once; the server reads 2 ahead
    steps = [int.from_bytes((await recv(ws))[:8], "little") for _ in frames]  # type: ignore[arg-type]
    sampler.cancel()
    assert steps == [40 * (i + 1) for i in range(30)]
    assert max(seen) <= LIMITS["ws_max_in_flight"] and max(seen) >= 1
    await ws.close()


async def test_session_count_over_http_and_websocket(
    redis_server: RedisServer, loaded: dict[str, RecurrentModel]
) -> None:
    with live_server(db_url(redis_server, 6), {"gru": loaded["gru_stacked"]}, max_sessions=2) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            for _ in range(2):
                await create(c)
            assert_problem(await c.post("/v1/sessions", json={}), 429, "too_many_sessions", "2")
            ws, message = await open_stream(server, "/v1/stream")
            assert_ws_problem(message, 429, "too_many_sessions")
            assert await close_code(ws) == 1008  # a limit: the policy close


async def test_one_session_id_rule_everywhere(client: httpx.AsyncClient, limited: LiveServer) -> None:
    longest, too_long = "a" * 128, "a" * 129
    assert (await client.post("/v1/sessions", json={"session_id": longest})).status_code == 201
    assert (await client.get(f"/v1/sessions/{longest}")).status_code == 200
    r = await client.post("/v1/sessions", json={"session_id": too_long})
    assert_problem(r, 422, "invalid_input", "session_id")
    for bad in (too_long, "a" * 300, "-leading-dash", "_under", "~tilde"):
        for method, path in [
            ("GET", ""),
            ("DELETE", ""),
            ("POST", "/reset"),
            ("POST", "/step"),
            ("GET", "/state"),
        ]:
            body = orjson.dumps({"inputs": {"x": x(1)}}) if path == "/step" else None
            r = await client.request(method, f"/v1/sessions/{bad}{path}", content=body)
            assert_problem(r, 404, "session_not_found")
        ws, message = await open_stream(limited, f"/v1/sessions/{bad}/stream")
        assert_ws_problem(message, 404, "session_not_found")
        assert await close_code(ws) == 4404
