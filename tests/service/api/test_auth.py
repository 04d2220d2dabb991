"""Access control end to end (service/api/auth.py): API keys over HTTP and WebSocket, ownership
(404 across keys on every route), key reload without restart, per-key limits (429 + Retry-After,
WebSocket 1008) across replicas, CORS, keys never in logs, the OpenAPI security scheme. Real
uvicorn, real Redis, real ONNX Runtime."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from service.api.auth import Auth
from service.app import _reload_keys_on_sighup
from service.engine.model import RecurrentModel
from service.keys import KeyRing, key_line, new_key
from tests.live_server import API_MODELS, LiveServer, live_server
from tests.redis_fixture import RedisServer

TIMEOUT_S = 30.0
STEP = {"inputs": {"x": [[0.5, -1.0, 0.25, 2.0], [0.0, 0.1, 0.2, 0.3]]}}
ALICE, BOB, CAROL = new_key(), new_key(), new_key()
CLIENT_LOGGERS = ("httpx", "httpcore", "websockets.client")


def write_keys(path: Path, **keys: str) -> Path:
    path.write_text("# test keys\n" + "".join(key_line(name, key) + "\n" for name, key in keys.items()))
    return path


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def fresh_db(redis: RedisServer, db: int) -> str:
    with redis.client() as c:
        c.select(db)
        c.flushdb()
    return redis.url.rsplit("/", 1)[0] + f"/{db}"


@contextlib.contextmanager
def keyed_server(
    redis_url: str, models: dict[str, RecurrentModel], key_file: Path, **settings: Any
) -> Iterator[LiveServer]:
    with live_server(redis_url, models, api_keys_file=key_file, ws_auth_timeout_s=0.5, **settings) as server:
        yield server


@pytest.fixture(scope="module")
def models(loaded: dict[str, RecurrentModel]) -> dict[str, RecurrentModel]:
    return {name: loaded[key] for name, key in API_MODELS.items()}


@pytest.fixture(scope="module")
def server(
    redis_server: RedisServer, models: dict[str, RecurrentModel], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    key_file = write_keys(tmp_path_factory.mktemp("keys") / "keys.txt", alice=ALICE, bob=BOB)
    with keyed_server(fresh_db(redis_server, 6), models, key_file, access_log=True) as s:  # for the log test
        yield s


@pytest.fixture
async def http(server: LiveServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT_S) as c:
        yield c


async def create(http: httpx.AsyncClient, key: str, **body: Any) -> str:
    r = await http.post("/v1/sessions", json=body, headers=bearer(key))
    assert r.status_code == 201, r.text
    return str(r.json()["session_id"])


def assert_problem(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = r.json()
    assert body["code"] == code, body
    return body


async def ws_open(server: LiveServer, path: str, key: str | None = None) -> ClientConnection:
    headers = bearer(key) if key else None
    return await connect(server.ws_url + path, additional_headers=headers, open_timeout=TIMEOUT_S)


async def ws_json(ws: ClientConnection) -> dict[str, Any]:
    message: dict[str, Any] = orjson.loads(await asyncio.wait_for(ws.recv(), TIMEOUT_S))
    return message


async def ws_closed(ws: ClientConnection) -> tuple[int, str]:
    with pytest.raises(ConnectionClosed) as closed:
        extra = await asyncio.wait_for(ws.recv(), TIMEOUT_S)
        pytest.fail(f"expected the close, got {extra!r:.200}")
    assert closed.value.rcvd is not None
    return closed.value.rcvd.code, closed.value.rcvd.reason


async def ws_refused(ws: ClientConnection, code: str) -> None:
    """An error message with ``code``, then a 1008 close whose reason is that code."""
    message = await ws_json(ws)
    assert (message["type"], message["code"]) == ("error", code), message
    assert await ws_closed(ws) == (1008, code)


# -- authentication -------------------------------------------------------------------------------------
async def test_no_or_an_unknown_key_is_401(http: httpx.AsyncClient) -> None:
    for headers in ({}, bearer("co_not-a-key"), {"Authorization": f"Basic {ALICE}"}, {"Authorization": "Bearer"}):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/sessions"), ("GET", "/v1/sessions/abc")):
            r = await http.request(method, path, headers=headers)
            body = assert_problem(r, 401, "unauthorized")
            assert r.headers["www-authenticate"] == "Bearer"
            assert "request_id" in body
    assert (await http.get("/v1/models", headers=bearer(ALICE))).status_code == 200


async def test_operations_routes_stay_open(http: httpx.AsyncClient) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"):
        assert (await http.get(path)).status_code == 200, path


async def test_openapi_declares_the_bearer_scheme_on_protected_routes(http: httpx.AsyncClient) -> None:
    schema = (await http.get("/openapi.json")).json()
    scheme = schema["components"]["securitySchemes"]["apiKey"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            if path.startswith("/v1/"):
                assert operation["security"] == [{"apiKey": []}], path
                assert {"401", "429"} <= set(operation["responses"]), path
            else:
                assert "security" not in operation, path


# -- ownership --------------------------------------------------------------------------------------
async def test_another_keys_session_is_404_on_every_route(http: httpx.AsyncClient, server: LiveServer) -> None:
    sid = await create(http, ALICE)
    assert (await http.post(f"/v1/sessions/{sid}/step", json=STEP, headers=bearer(ALICE))).json()["step"] == 2
    state = (await http.get(f"/v1/sessions/{sid}/state", headers=bearer(ALICE))).content
    base = f"/v1/sessions/{sid}"
    calls: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", base, {}),
        ("POST", f"{base}/step", {"json": STEP}),
        ("POST", f"{base}/reset", {}),
        ("GET", f"{base}/state", {}),
        ("PUT", f"{base}/state", {"content": state, "headers": {"content-type": "application/x-npz"}}),
        ("DELETE", base, {}),
        ("POST", "/v1/sessions", {"json": {"fork_from": sid}}),
    ]
    for method, path, kwargs in calls:
        headers = {**kwargs.pop("headers", {}), **bearer(BOB)}
        r = await http.request(method, path, headers=headers, **kwargs)
        body = assert_problem(r, 404, "session_not_found")
        assert "another" not in body["detail"]  # never confirms that the session exists
    ws = await ws_open(server, f"{base}/stream", BOB)
    message = await ws_json(ws)
    assert (message["type"], message["code"]) == ("error", "session_not_found")
    assert (await ws_closed(ws))[0] == 4404
    info = (await http.get(base, headers=bearer(ALICE))).json()
    assert info["step"] == 2  # untouched by every refused call
    # Client-chosen ids are per key: bob may use alice's id for a session of his own.
    assert await create(http, BOB, session_id=sid) == sid
    assert (await http.get(base, headers=bearer(BOB))).json()["step"] == 0


# -- WebSocket authentication -------------------------------------------------------------------------
async def test_websocket_header_or_first_message_authenticates(server: LiveServer) -> None:
    ws = await ws_open(server, "/v1/stream", ALICE)
    hello = await ws_json(ws)
    assert hello["type"] == "session"
    await ws.close()
    ws = await ws_open(server, f"/v1/sessions/{hello['session_id']}/stream")  # a browser: no headers
    await ws.send(orjson.dumps({"type": "auth", "api_key": ALICE}).decode())
    assert (await ws_json(ws))["session_id"] == hello["session_id"]
    await ws.send(orjson.dumps(STEP).decode())
    assert (await ws_json(ws))["step"] == 2
    await ws.close()


async def test_websocket_without_a_good_key_closes_1008(server: LiveServer) -> None:
    ws = await ws_open(server, "/v1/stream", "co_wrong")
    await ws_refused(ws, "unauthorized")
    for first in ({"type": "auth", "api_key": "co_wrong"}, {"type": "auth"}, STEP):
        ws = await ws_open(server, "/v1/stream")
        await ws.send(orjson.dumps(first).decode())
        await ws_refused(ws, "unauthorized")
    started = time.monotonic()
    ws = await ws_open(server, "/v1/stream")  # says nothing: closed after ws_auth_timeout_s
    await ws_refused(ws, "unauthorized")
    assert 0.4 < time.monotonic() - started < 10


# -- keys never in logs ---------------------------------------------------------------------------------
async def test_keys_never_appear_in_logs(
    http: httpx.AsyncClient, server: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = new_key()
    await create(http, ALICE)
    await http.get("/v1/models", headers=bearer(wrong))
    ws = await ws_open(server, "/v1/stream")
    await ws.send(orjson.dumps({"type": "auth", "api_key": wrong}).decode())
    await ws_refused(ws, "unauthorized")
    await asyncio.sleep(0.1)  # the access log line is written after the response
    assert any(r.name == "service.access" for r in caplog.records), "the access log was not captured"
    for record in caplog.records:
        if record.name.startswith(CLIENT_LOGGERS):  # this test's own clients, not the server
            continue
        text = f"{record.getMessage()} {vars(record)}"
        assert ALICE not in text and wrong not in text, record


# -- reload without restart -----------------------------------------------------------------------------
async def test_edited_key_file_applies_without_restart(
    redis_server: RedisServer, models: dict[str, RecurrentModel], tmp_path: Path
) -> None:
    key_file = write_keys(tmp_path / "keys.txt", alice=ALICE)
    with keyed_server(fresh_db(redis_server, 7), models, key_file) as s:
        async with httpx.AsyncClient(base_url=s.url, timeout=TIMEOUT_S) as c:
            assert (await c.get("/v1/models", headers=bearer(ALICE))).status_code == 200
            assert (await c.get("/v1/models", headers=bearer(CAROL))).status_code == 401
            write_keys(key_file, carol=CAROL)
            await asyncio.sleep(1.2)  # the key ring looks at the file at most once a second
            assert (await c.get("/v1/models", headers=bearer(CAROL))).status_code == 200
            assert_problem(await c.get("/v1/models", headers=bearer(ALICE)), 401, "unauthorized")


async def test_sighup_reloads_the_keys(tmp_path: Path) -> None:
    key_file = write_keys(tmp_path / "keys.txt", alice=ALICE)
    ring = KeyRing(key_file, check_interval_s=3600)  # no change detection: only the signal reloads
    assert ring.authenticate(ALICE) is not None  # (the first call looks at the file: before the edit)
    _reload_keys_on_sighup(Auth(ring))
    try:
        write_keys(key_file, bob=BOB)
        assert ring.authenticate(BOB) is None
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(100):
            await asyncio.sleep(0.01)
            if ring.authenticate(BOB) is not None:
                break
        assert ring.authenticate(BOB) is not None and ring.authenticate(ALICE) is None
    finally:
        asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)


# -- CORS -------------------------------------------------------------------------------------------
async def test_cors_is_off_unless_configured(
    http: httpx.AsyncClient, redis_server: RedisServer, models: dict[str, RecurrentModel], tmp_path: Path
) -> None:
    preflight = {
        "Origin": "https://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    r = await http.options("/v1/sessions", headers=preflight)
    assert "access-control-allow-origin" not in r.headers
    key_file = write_keys(tmp_path / "keys.txt", alice=ALICE)
    with keyed_server(fresh_db(redis_server, 8), models, key_file, cors_origins=["https://app.example"]) as s:
        async with httpx.AsyncClient(base_url=s.url, timeout=TIMEOUT_S) as c:
            r = await c.options("/v1/sessions", headers=preflight)
            assert r.status_code == 200
            assert r.headers["access-control-allow-origin"] == "https://app.example"
            assert "authorization" in r.headers["access-control-allow-headers"].lower()
            r = await c.options("/v1/sessions", headers={**preflight, "Origin": "https://evil.example"})
            assert "access-control-allow-origin" not in r.headers


# -- per-key limits ---------------------------------------------------------------------------------------
async def test_rate_limit_holds_across_two_replicas(
    redis_server: RedisServer, models: dict[str, RecurrentModel], tmp_path: Path
) -> None:
    key_file = write_keys(tmp_path / "keys.txt", alice=ALICE, bob=BOB)
    url = fresh_db(redis_server, 9)
    limits = {"rate_limit_rps": 1.0, "rate_limit_burst": 3}
    with keyed_server(url, models, key_file, **limits) as a, keyed_server(url, models, key_file, **limits) as b:
        async with httpx.AsyncClient(timeout=TIMEOUT_S) as c:
            statuses = [(await c.get(f"{s.url}/v1/models", headers=bearer(ALICE))).status_code for s in (a, b) * 2]
            assert statuses == [200, 200, 200, 429]
            r = await c.get(f"{a.url}/v1/models", headers=bearer(ALICE))
            assert_problem(r, 429, "rate_limited")
            assert int(r.headers["retry-after"]) >= 1
            assert (await c.get(f"{b.url}/v1/models", headers=bearer(BOB))).status_code == 200  # bob's own bucket
            assert (await c.get(f"{b.url}/healthz")).status_code == 200  # operations are not limited
        await asyncio.sleep(2.1)  # two tokens back (of three)
        ws = await ws_open(b, "/v1/stream", ALICE)  # the open takes a token, as does each chunk
        assert (await ws_json(ws))["type"] == "session"
        for _ in range(5):
            await ws.send(orjson.dumps(STEP).decode())
        replies = [await ws_json(ws)]
        while replies[-1]["type"] == "result":
            replies.append(await ws_json(ws))
        assert 1 <= len(replies) - 1 <= 2  # one chunk (two on a slow machine) had a token
        assert replies[-1]["code"] == "rate_limited" and replies[-1]["retry_after"] > 0
        assert await ws_closed(ws) == (1008, "rate_limited")


async def test_session_and_stream_limits_per_key(
    redis_server: RedisServer, models: dict[str, RecurrentModel], tmp_path: Path
) -> None:
    key_file = write_keys(tmp_path / "keys.txt", alice=ALICE, bob=BOB)
    limits = {"max_sessions_per_key": 2, "max_streams_per_key": 1}
    with keyed_server(fresh_db(redis_server, 10), models, key_file, **limits) as s:
        async with httpx.AsyncClient(base_url=s.url, timeout=TIMEOUT_S) as c:
            first = await create(c, ALICE)
            ws = await ws_open(s, "/v1/stream", ALICE)  # the second session, over a stream
            assert (await ws_json(ws))["type"] == "session"
            r = await c.post("/v1/sessions", headers=bearer(ALICE))
            body = assert_problem(r, 429, "too_many_sessions")
            assert "limit of 2" in body["detail"] and r.headers["retry-after"] == "1"
            await create(c, BOB)  # per key: bob still may
            second = await ws_open(s, f"/v1/sessions/{first}/stream", ALICE)  # one stream per key
            await ws_refused(second, "too_many_streams")
            await ws.close()
            await asyncio.sleep(0.2)
            third = await ws_open(s, f"/v1/sessions/{first}/stream", ALICE)
            assert (await ws_json(third))["type"] == "session"
            await third.close()
            await asyncio.sleep(0.2)
            fourth = await ws_open(s, "/v1/stream", ALICE)  # a new session over the limit: 1008
            await ws_refused(fourth, "too_many_sessions")
            assert (await c.delete(f"/v1/sessions/{first}", headers=bearer(ALICE))).status_code == 204
            await create(c, ALICE)
