"""Replicas proven with plain processes: real ``carryover serve`` processes on one Redis, the
client (as a load balancer would) sending a session's requests to either. Exactly-once across
replicas, a SIGKILLed replica mid-stream, and SIGTERM under ``--workers 2`` answering every
chunk its WebSockets read. The processes start together, once per module."""

from __future__ import annotations

import contextlib
import io
import json
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from model_export.verify import random_inputs
from service.engine.model import RecurrentModel
from tests.conftest import Exported
from tests.engines import assert_matches_offline
from tests.redis_fixture import RedisServer
from tests.service.test_serve import ServeProcess


@dataclass
class Fleet:
    a: ServeProcess  # single worker, text logs
    b: ServeProcess  # single worker, text logs
    victim: ServeProcess  # SIGKILLed by its test
    workers: ServeProcess  # --workers 2, JSON logs, SIGTERMed by its test


@pytest.fixture(scope="module")
def fleet(
    redis_server: RedisServer, exported: dict[str, Exported], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("replicas")
    common = (
        "--model",
        f"gru={exported['gru_stacked'].sequence}",
        "--redis-url",
        redis_server.url,
        "--access-log",
        "true",
    )
    procs = [ServeProcess(tmp, *common, wait=False) for _ in range(3)]
    procs.append(ServeProcess(tmp, *common, "--workers", "2", "--log-format", "json", wait=False))
    try:
        for p in procs:
            p.wait_ready()
        yield Fleet(*procs)
    finally:
        for p in procs:
            if p.proc.poll() is None:
                p.terminate()


@pytest.fixture
def gru(loaded: dict[str, RecurrentModel]) -> RecurrentModel:
    return loaded["gru_stacked"]


def new_session(url: str) -> str:
    sid: str = httpx.post(url + "/v1/sessions", json={}).json()["session_id"]
    return sid


def post_step(url: str, sid: str, x: np.ndarray, at: int) -> httpx.Response:
    return httpx.post(f"{url}/v1/sessions/{sid}/step", json={"inputs": {"x": x.tolist()}, "step": at}, timeout=30)


def state_of(url: str, sid: str) -> Any:
    return np.load(io.BytesIO(httpx.get(f"{url}/v1/sessions/{sid}/state").content))


def check_offline(model: RecurrentModel, url: str, sid: str, xs: list[np.ndarray], ys: list[np.ndarray]) -> None:
    """The session's stored step, state and the outputs the client got equal the offline run."""
    state = state_of(url, sid)
    assert int(state["carryover_step"]) == sum(len(x) for x in xs)
    assert_matches_offline(model, {"x": np.concatenate(xs)}, {"y": np.concatenate(ys)}, {"h0": state["h0"]})


def test_requests_alternating_between_replicas_match_offline(fleet: Fleet, gru: RecurrentModel) -> None:
    rng = np.random.default_rng(1)
    urls = [fleet.a.url, fleet.b.url]
    sid = new_session(urls[0])
    xs, ys, at = [], [], 0
    for i in range(8):
        x = random_inputs(gru.contract, int(rng.integers(1, 5)), rng)["x"]
        reply = post_step(urls[i % 2], sid, x, at)
        assert reply.status_code == 200, reply.text
        at = reply.json()["step"]
        xs.append(x)
        ys.append(np.asarray(reply.json()["outputs"]["y"]))
    # a retry of the last request on the OTHER replica is a replay, not a second application
    retry = post_step(urls[0], sid, xs[-1], at - len(xs[-1]))
    assert retry.status_code == 200 and retry.headers.get("Idempotent-Replay") == "true"
    np.testing.assert_array_equal(np.asarray(retry.json()["outputs"]["y"]), ys[-1])
    check_offline(gru, urls[1], sid, xs, ys)


def test_one_request_sent_to_both_replicas_at_once_applies_once(fleet: Fleet, gru: RecurrentModel) -> None:
    rng = np.random.default_rng(2)
    sid = new_session(fleet.a.url)
    xs, ys, at = [], [], 0
    with ThreadPoolExecutor(2) as pool:
        for _ in range(6):
            x = random_inputs(gru.contract, int(rng.integers(1, 6)), rng)["x"]
            start = threading.Barrier(2)

            def send(url: str, x: np.ndarray = x, at: int = at, start: threading.Barrier = start) -> httpx.Response:
                start.wait()
                return post_step(url, sid, x, at)

            replies = list(pool.map(send, [fleet.a.url, fleet.b.url]))
            assert [r.status_code for r in replies] == [200, 200], [r.text for r in replies]
            # one applied it, the other answered the same outputs as a replay
            assert sorted(r.headers.get("Idempotent-Replay", "false") for r in replies) == ["false", "true"]
            outs = [np.asarray(r.json()["outputs"]["y"]) for r in replies]
            np.testing.assert_array_equal(outs[0], outs[1])
            at += len(x)
            assert {r.json()["step"] for r in replies} == {at}
            xs.append(x)
            ys.append(outs[0])
    check_offline(gru, fleet.b.url, sid, xs, ys)


def test_a_replica_killed_mid_stream_loses_no_acknowledged_step(fleet: Fleet, gru: RecurrentModel) -> None:
    """The client streams to the victim; SIGKILL while a request is in flight; the client retries
    that request (same ``step``) on another replica and finishes there: nothing lost or doubled."""
    rng = np.random.default_rng(3)
    sid = new_session(fleet.victim.url)
    chunks = [random_inputs(gru.contract, int(rng.integers(50, 200)), rng)["x"] for _ in range(10)]
    ys: list[np.ndarray] = []
    at = 0
    for x in chunks[:4]:
        reply = post_step(fleet.victim.url, sid, x, at)
        ys.append(np.asarray(reply.json()["outputs"]["y"]))
        at = reply.json()["step"]
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(post_step, fleet.victim.url, sid, chunks[4], at)
        fleet.victim.kill()
        with contextlib.suppress(httpx.TransportError):
            in_flight.result()  # answered just before the kill, or cut off: either way, retry it
    for x in chunks[4:]:
        reply = post_step(fleet.a.url, sid, x, at)  # the client's retry goes to another replica
        assert reply.status_code == 200, reply.text
        ys.append(np.asarray(reply.json()["outputs"]["y"]))
        at = reply.json()["step"]
    check_offline(gru, fleet.b.url, sid, chunks, ys)


def test_sigterm_under_two_workers_answers_every_accepted_chunk(fleet: Fleet, gru: RecurrentModel) -> None:
    """A client pipelines chunks as fast as the server reads them; SIGTERM to the ``--workers 2``
    server. Every chunk the server read is answered (in order) before the 1012 close, and the
    stored step is exactly the sum of the answered chunks: none applied unanswered."""
    rng = np.random.default_rng(4)
    sid = new_session(fleet.a.url)
    chunks = [random_inputs(gru.contract, 64, rng)["x"] for _ in range(400)]
    replies: list[dict[str, Any]] = []
    ws_url = fleet.workers.url.replace("http", "ws") + f"/v1/sessions/{sid}/stream"
    with connect(ws_url, max_size=None) as ws:
        assert json.loads(ws.recv())["type"] == "session"

        def send_all() -> None:
            try:
                for i, x in enumerate(chunks):
                    ws.send(json.dumps({"inputs": {"x": x.tolist()}, "id": i}))
            except ConnectionClosed:
                pass  # the server closed: the rest was never read

        sender = threading.Thread(target=send_all, daemon=True)
        sender.start()
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                replies.append(json.loads(ws.recv()))
                if len(replies) == 5:
                    fleet.workers.proc.send_signal(signal.SIGTERM)
        sender.join(30)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
    assert fleet.workers.terminate() == 0
    assert all(r["type"] == "result" for r in replies), replies[-1]
    n = len(replies)
    assert [r["id"] for r in replies] == list(range(n)) and n < len(chunks)
    check_offline(gru, fleet.a.url, sid, chunks[:n], [np.asarray(r["outputs"]["y"]) for r in replies])


def test_one_access_line_per_request(fleet: Fleet) -> None:
    request_id = f"once-{uuid.uuid4().hex}"
    assert httpx.get(fleet.b.url + "/healthz", headers={"X-Request-ID": request_id}).status_code == 200
    # the access line is written after the response is sent: wait for it rather than race it
    deadline = time.monotonic() + 5
    while request_id not in fleet.b.output() and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)  # and a moment more, so a second (duplicate) line would show up too
    lines = [line for line in fleet.b.output().splitlines() if request_id in line]
    assert len(lines) == 1 and "service.access" in lines[0] and "route=/healthz" in lines[0], lines
    assert "uvicorn.access" not in fleet.b.output()


def test_every_worker_logs_its_start_lines_as_json(fleet: Fleet) -> None:
    """Runs after the ``--workers 2`` server has stopped: its whole log is JSON, and each worker
    process logged the model, ready and stop lines and its own access lines."""
    if fleet.workers.proc.poll() is None:
        pytest.skip("needs the SIGTERM test to have stopped the --workers 2 server")
    records = [json.loads(line) for line in Path(fleet.workers.log_path).read_text().splitlines()]
    assert all({"time", "level", "logger", "pid", "message"} <= r.keys() for r in records)
    pids = {r["pid"] for r in records if r["message"].startswith("carryover ready")}
    assert len(pids) == 2, "each of the two workers logs its ready line"
    for pid in pids:
        mine = [r["message"] for r in records if r["pid"] == pid]
        assert any("runs on CPUExecutionProvider" in m for m in mine)
        assert "carryover stopped" in mine
    access = [r for r in records if r["logger"] == "service.access"]
    assert access and all({"method", "route", "status", "duration_ms", "request_id"} <= r.keys() for r in access)
    assert not [r for r in records if r["logger"] == "uvicorn.access"]
    assert not [r for r in records if r["level"] == "ERROR"], "a clean drain logs no errors"
