"""Per-session constants through a running service (real uvicorn, real Redis, the committed
attention decoder of ``model_export/examples/attention_decoder.py``, both forms): sessions whose
memories have different lengths, stepped concurrently in chunks of different sizes, equal the
offline reference (each session's whole unpadded sequence alone, B = 1, with its unpadded
memory); another server process on the same Redis sees the constants; a bad constant is a 4xx
naming it and creates nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import numpy as np
import orjson
import pytest
import redis

from model_export.verify import unpadded_run
from service.client.core import GenerationDone
from service.client.sync import Client
from service.engine.model import RecurrentModel
from service.store.record import KEY_PATTERN
from tests.live_server import LiveServer, live_server
from tests.make_models import committed_example
from tests.redis_fixture import RedisServer
from tests.service.api.test_http import npz
from tests.service.api.test_ws import open_stream, recv_json

LENGTHS = (3, 7, 12)
SPLITS = ((2, 5, 1), (1, 1, 6), (8,))  # each session's chunk sizes (8 steps in all)
MEMORY_DIM = 10
VOCAB = 11
SETTINGS = {"max_constant_bytes": 4096, "max_wait_us": 20_000}


def load_models() -> dict[str, RecurrentModel]:
    e = committed_example("attention_decoder")
    return {"attn": RecurrentModel(e.sequence, name="attn"), "attn_step": RecurrentModel(e.step, name="attn_step")}


@pytest.fixture(scope="module")
def models(loaded: dict[str, RecurrentModel]) -> dict[str, RecurrentModel]:
    return {**load_models(), "gru": loaded["gru_stacked"]}


@pytest.fixture(scope="module")
def server(redis_server: RedisServer, models: dict[str, RecurrentModel]) -> Iterator[LiveServer]:
    with live_server(redis_server.url, models, **SETTINGS) as s:
        yield s


def memory(length: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((length, MEMORY_DIM)).astype(np.float32)


def tokens(seed: int, steps: int = 8) -> np.ndarray:
    return np.random.default_rng(100 + seed).integers(0, VOCAB, steps).astype(np.int64)


def session_keys(redis_server: RedisServer) -> int:
    with redis.Redis.from_url(redis_server.url) as r:
        return len(list(r.scan_iter(match=KEY_PATTERN)))


async def run_session(http: httpx.AsyncClient, model: str, i: int) -> tuple[str, np.ndarray]:
    created = await http.post(
        "/v1/sessions", json={"model": model, "constants": {"memory": memory(LENGTHS[i], i).tolist()}}
    )
    assert created.status_code == 201, created.text
    sid = created.json()["session_id"]
    toks, out, at = tokens(i), [], 0
    for size in SPLITS[i]:
        r = await http.post(
            f"/v1/sessions/{sid}/step", json={"inputs": {"tokens": toks[at : at + size].tolist()}, "step": at}
        )
        assert r.status_code == 200, r.text
        out.append(np.asarray(r.json()["outputs"]["logits"], np.float32))
        at += size
    return sid, np.concatenate(out)


@pytest.mark.parametrize("model", ["attn", "attn_step"])
async def test_sessions_of_different_memory_lengths_batched_together_equal_the_offline_run(
    server: LiveServer, models: dict[str, RecurrentModel], model: str
) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        results = await asyncio.gather(*(run_session(http, model, i) for i in range(len(LENGTHS))))
        for i, (sid, logits) in enumerate(results):
            ref_out, ref_state = unpadded_run(models[model], {"tokens": tokens(i)}, {"memory": memory(LENGTHS[i], i)})
            np.testing.assert_allclose(logits, ref_out["logits"], atol=1e-5, rtol=0)
            state = npz((await http.get(f"/v1/sessions/{sid}/state")).content)
            np.testing.assert_allclose(state["h"], ref_state["h"], atol=1e-5, rtol=0)
            info = (await http.get(f"/v1/sessions/{sid}")).json()
            assert info["constants"] == {"memory": [LENGTHS[i], MEMORY_DIM]} and info["step"] == 8


def test_models_list_their_constants(server: LiveServer) -> None:
    listed = {m["name"]: m for m in httpx.get(f"{server.url}/v1/models").json()["models"]}
    assert listed["attn"]["constants"] == [
        {
            "name": "memory",
            "dtype": "float32",
            "shape": ["L", MEMORY_DIM],
            "batch_axis": 0,
            "length_axis": 1,
            "mask": "memory_mask",
        }
    ]
    assert "constants" not in listed["gru"]
    sid = httpx.post(f"{server.url}/v1/sessions", json={"model": "gru"}).json()["session_id"]
    assert "constants" not in httpx.get(f"{server.url}/v1/sessions/{sid}").json()


def test_reset_and_fork_keep_the_constants_and_another_server_sees_them(
    server: LiveServer, redis_server: RedisServer, models: dict[str, RecurrentModel]
) -> None:
    mem, toks = memory(7, 42), tokens(42)
    ref_out, ref_state = unpadded_run(models["attn"], {"tokens": toks}, {"memory": mem})
    with Client(server.url) as client:
        session = client.create("attn", constants={"memory": mem})  # numpy straight through the client
        np.testing.assert_allclose(
            session.step({"tokens": toks[:3]})["logits"], ref_out["logits"][:3], atol=1e-5, rtol=0
        )
        session.reset()
        np.testing.assert_allclose(session.step({"tokens": toks})["logits"], ref_out["logits"], atol=1e-5, rtol=0)
        fork = httpx.post(f"{server.url}/v1/sessions", json={"fork_from": session.id}).json()["session_id"]
        assert httpx.get(f"{server.url}/v1/sessions/{fork}").json()["constants"] == {"memory": [7, MEMORY_DIM]}
    # A second server process on the same Redis (a replica, or this one after a restart).
    with live_server(redis_server.url, load_models(), **SETTINGS) as other, httpx.Client(base_url=other.url) as http:
        more = tokens(43, 4)
        r = http.post(f"/v1/sessions/{fork}/step", json={"inputs": {"tokens": more.tolist()}, "step": 8})
        assert r.status_code == 200, r.text
        whole, _ = unpadded_run(models["attn"], {"tokens": np.concatenate([toks, more])}, {"memory": mem})
        np.testing.assert_allclose(r.json()["outputs"]["logits"], whole["logits"][8:], atol=1e-5, rtol=0)
        np.testing.assert_allclose(
            npz(http.get(f"/v1/sessions/{session.id}/state").content)["h"], ref_state["h"], atol=1e-5
        )


def test_a_generation_attends_over_the_sessions_memory(server: LiveServer, models: dict[str, RecurrentModel]) -> None:
    mem = memory(5, 7)
    with Client(server.url) as client:
        session = client.create("attn_step", constants={"memory": mem})
        events = list(session.generate("abc", max_tokens=6, temperature=0))
    done = events[-1]
    assert isinstance(done, GenerationDone)
    fed = np.array([*b"abc"], np.int64) - ord("a")  # vocab "abcdefghij?": a..j are 0..9
    generated = np.asarray(done.tokens, np.int64)
    ref_out, _ = unpadded_run(models["attn_step"], {"tokens": np.concatenate([fed, generated[:-1]])}, {"memory": mem})
    np.testing.assert_array_equal(ref_out["logits"][2:].argmax(axis=-1), generated)


MEM = [[0.5] * MEMORY_DIM] * 3


def attn(memory: object) -> dict[str, object]:
    return {"model": "attn", "constants": {"memory": memory}}


BAD: list[tuple[str, dict[str, object] | bytes, int, str]] = [
    ("wrong shape", {"model": "attn", "constants": {"memory": [[0.5] * 9]}}, 422, "constant 'memory' has shape [1, 9]"),
    ("no length", {"model": "attn", "constants": {"memory": []}}, 422, "'memory'"),
    (
        "wrong dtype",
        {"model": "attn", "constants": {"memory": [["x"] * MEMORY_DIM]}},
        422,
        "constant 'memory' must hold numbers",
    ),
    ("not an array", {"model": "attn", "constants": {"memory": 3}}, 422, "constants"),
    (
        "ragged",
        {"model": "attn", "constants": {"memory": [[0.5] * MEMORY_DIM, [0.5]]}},
        422,
        "'memory' must be a rectangular",
    ),
    (
        "too large",
        {"model": "attn", "constants": {"memory": [[0.5] * MEMORY_DIM] * 200}},
        413,
        "max_constant_bytes=4096",
    ),
    (
        "NaN",
        b'{"model": "attn", "constants": {"memory": [[NaN, 1, 2, 3, 4, 5, 6, 7, 8, 9]]}}',
        422,
        "'memory' contains NaN",
    ),
    (
        "overflow",
        {"model": "attn", "constants": {"memory": [[1e39] * MEMORY_DIM]}},
        422,
        "'memory' contains NaN or Inf",
    ),
    ("missing", {"model": "attn"}, 422, "missing 'constants': this model needs ['memory']"),
    ("unknown", {"model": "attn", "constants": {"memory": MEM, "keys": MEM}}, 422, "unknown constant 'keys'"),
    ("unexpected", {"model": "gru", "constants": {"memory": MEM}}, 422, "'constants' given, but this model takes none"),
    ("not an object", {"model": "attn", "constants": [MEM]}, 422, "constants"),
]


@pytest.mark.parametrize(("case", "body", "status", "detail"), BAD, ids=[c[0] for c in BAD])
def test_bad_constants_are_4xx_naming_the_field_and_create_nothing(
    server: LiveServer, redis_server: RedisServer, case: str, body: dict[str, object] | bytes, status: int, detail: str
) -> None:
    before = session_keys(redis_server)
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    r = httpx.post(f"{server.url}/v1/sessions", content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    problem = r.json()
    assert detail in problem["detail"] or any(detail.strip("'") in str(e) for e in problem.get("errors", [])), problem
    assert session_keys(redis_server) == before


def test_a_fork_cannot_be_given_constants(server: LiveServer) -> None:
    sid = httpx.post(f"{server.url}/v1/sessions", json={"model": "attn", "constants": {"memory": MEM}}).json()[
        "session_id"
    ]
    r = httpx.post(f"{server.url}/v1/sessions", json={"fork_from": sid, "constants": {"memory": MEM}})
    assert r.status_code == 422 and "a fork keeps its source's constants" in r.json()["detail"]


async def test_a_websocket_attaches_to_a_session_with_constants_but_cannot_create_one(server: LiveServer) -> None:
    """Constants are given at create, over HTTP (or the client); a WebSocket attaches to the session."""
    ws, hello = await open_stream(server, "/v1/stream?model=attn")
    async with ws:
        assert hello["type"] == "error" and "missing 'constants'" in hello["detail"], hello
    sid = httpx.post(f"{server.url}/v1/sessions", json=attn(MEM)).json()["session_id"]
    ws, hello = await open_stream(server, f"/v1/sessions/{sid}/stream")
    async with ws:
        assert hello["type"] == "session"
        await ws.send(orjson.dumps({"inputs": {"tokens": [1, 2]}}).decode())
        reply = await recv_json(ws)
        assert reply["type"] == "result" and reply["step"] == 2, reply


def test_v2_cannot_start_a_sequence_of_a_model_with_constants(server: LiveServer) -> None:
    """``/v2`` has no way to give constants: a sequence start is refused, naming them."""
    body = {
        "inputs": [{"name": "tokens", "shape": [1, 2], "datatype": "INT64", "data": [1, 2]}],
        "parameters": {"sequence_id": 7, "sequence_start": True},
    }
    r = httpx.post(f"{server.url}/v2/models/attn/infer", json=body)
    assert 400 <= r.status_code < 500 and "constants" in r.json()["error"], r.text


def test_v2_without_a_sequence_is_refused_too(server: LiveServer) -> None:
    body = {"inputs": [{"name": "tokens", "shape": [1, 2], "datatype": "INT64", "data": [1, 2]}]}
    r = httpx.post(f"{server.url}/v2/models/attn/infer", json=body)
    assert 400 <= r.status_code < 500 and "constants" in r.json()["error"], r.text
