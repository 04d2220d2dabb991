"""Generation over the wire against a real uvicorn and Redis: server-sent events read with httpx
streaming, the WebSocket ``generate`` / ``cancel`` messages, greedy == offline, seeds, a client
that disconnects mid-generation, and 16 concurrent generations sharing batches with a step."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from websockets.asyncio.client import connect

from service.api.state import app_state
from service.engine.model import RecurrentModel
from tests.live_server import LiveServer, live_server
from tests.redis_fixture import RedisServer
from tests.service.engine.test_generation import encode, offline_greedy

TIMEOUT_S = 60.0
PROMPT = "import os\n\ndef main():\n    "
Event = tuple[str, dict[str, Any]]


@pytest.fixture(scope="module")
def gen_server(redis_server: RedisServer, loaded: dict[str, RecurrentModel]) -> Iterator[LiveServer]:
    models = {"charlm": loaded["charlm"], "gru": loaded["gru_stacked"]}  # two models: routing is looked up
    with live_server(redis_server.url, models, max_generate_tokens=2000) as server:
        yield server


@pytest.fixture
async def http(gen_server: LiveServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gen_server.url, timeout=TIMEOUT_S) as client:
        yield client


async def create(http: httpx.AsyncClient, model: str = "charlm") -> str:
    r = await http.post("/v1/sessions", json={"model": model})
    assert r.status_code == 201, r.text
    return str(r.json()["session_id"])


async def sse_events(response: httpx.Response, limit: int | None = None) -> list[Event]:
    """Parse ``event:`` / ``data:`` lines (a blank line ends an event; ``:`` lines are pings)."""
    events: list[Event] = []
    name, data = "message", ""
    async for line in response.aiter_lines():
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data += line[5:].strip()
        elif not line and data:
            events.append((name, orjson.loads(data)))
            name, data = "message", ""
            if limit is not None and len(events) >= limit:
                break
    return events


async def generate(http: httpx.AsyncClient, sid: str, **body: Any) -> list[Event]:
    async with http.stream("POST", f"/v1/sessions/{sid}/generate", json=body) as r:
        assert r.status_code == 200, await r.aread()
        assert r.headers["content-type"].startswith("text/event-stream")
        return await sse_events(r)


async def state_of(http: httpx.AsyncClient, sid: str) -> dict[str, np.ndarray]:
    archive = np.load(io.BytesIO((await http.get(f"/v1/sessions/{sid}/state")).content), allow_pickle=False)
    return {k: archive[k] for k in archive.files}


async def test_sse_greedy_equals_offline_and_the_session_consumed_everything(
    http: httpx.AsyncClient, loaded: dict[str, RecurrentModel]
) -> None:
    model = loaded["charlm"]
    sid = await create(http)
    events = await generate(http, sid, prompt=PROMPT, max_tokens=25, temperature=0)
    *tokens, (kind, done) = events
    assert kind == "done" and all(k == "message" for k, _ in tokens)
    ref, ref_state, _ = offline_greedy(model, encode(model, PROMPT), 25)
    assert [t["token"] for _, t in tokens] == ref == done["tokens"]
    assert [t["step"] for _, t in tokens] == list(range(len(PROMPT) + 1, len(PROMPT) + 26))
    assert done == {
        "step": len(PROMPT) + 25,
        "tokens": ref,
        "text": "".join(t["text"] for _, t in tokens),
        "finish_reason": "length",
    }
    state = await state_of(http, sid)
    assert int(state["carryover_step"]) == len(PROMPT) + 25
    np.testing.assert_allclose(state["h0"], ref_state["h0"], atol=1e-5)


async def test_sse_seeds_and_errors_before_the_first_token(
    http: httpx.AsyncClient, loaded: dict[str, RecurrentModel]
) -> None:
    body = {"prompt": PROMPT, "max_tokens": 30, "temperature": 0.9, "top_p": 0.9, "seed": 42}
    a, b = await create(http), await create(http)
    assert (await generate(http, a, **body))[-1][1]["tokens"] == (await generate(http, b, **body))[-1][1]["tokens"]
    stale = await http.post(f"/v1/sessions/{a}/generate", json={**body, "step": 3})
    assert stale.status_code == 409 and stale.json()["current_step"] == len(PROMPT) + 30, stale.text
    assert (await http.post(f"/v1/sessions/{a}/generate", json={**body, "top_p": 2})).status_code == 422
    assert (await http.post(f"/v1/sessions/{a}/generate", json={**body, "max_tokens": 2001})).status_code == 422
    assert (await http.post("/v1/sessions/nope/generate", json=body)).status_code == 404
    features = await create(http, "gru")
    r = await http.post(f"/v1/sessions/{features}/generate", json=body)
    assert r.status_code == 422 and "token LM" in r.json()["detail"]
    fresh = await create(http)
    r = await http.post(f"/v1/sessions/{fresh}/generate", json={"prompt": "", "max_tokens": 3})
    assert r.status_code == 422 and "send a prompt" in r.json()["detail"]
    # With the right step it applies; the prompt as ids works like text.
    ids = encode(loaded["charlm"], PROMPT).tolist()
    done = (await generate(http, fresh, prompt=ids, max_tokens=5, temperature=0, step=0))[-1][1]
    assert done["step"] == len(PROMPT) + 5


async def test_a_client_that_disconnects_stops_its_generation_at_a_token_boundary(
    http: httpx.AsyncClient, loaded: dict[str, RecurrentModel]
) -> None:
    model = loaded["charlm"]
    sid = await create(http)
    async with http.stream(
        "POST", f"/v1/sessions/{sid}/generate", json={"prompt": PROMPT, "max_tokens": 2000, "temperature": 0}
    ) as r:
        first = await sse_events(r, limit=3)
    # The server notices, stops at a token boundary; what it applied stays and is consistent.
    steps = []
    for _ in range(100):
        await asyncio.sleep(0.05)
        steps.append((await http.get(f"/v1/sessions/{sid}")).json()["step"])
        if len(steps) > 4 and len(set(steps[-4:])) == 1:
            break
    step = steps[-1]
    generated = step - len(PROMPT)
    assert 3 <= generated < 2000, steps
    ref, ref_state, _ = offline_greedy(model, encode(model, PROMPT), generated)
    assert [e["token"] for _, e in first] == ref[:3]
    state = await state_of(http, sid)
    np.testing.assert_allclose(state["h0"], ref_state["h0"], atol=1e-5)


async def test_websocket_generate_cancel_and_fifo(gen_server: LiveServer, loaded: dict[str, RecurrentModel]) -> None:
    model = loaded["charlm"]
    async with connect(gen_server.ws_url + "/v1/stream?model=charlm", open_timeout=TIMEOUT_S) as ws:

        async def recv() -> dict[str, Any]:
            message: dict[str, Any] = orjson.loads(await asyncio.wait_for(ws.recv(), TIMEOUT_S))
            return message

        assert (await recv())["type"] == "session"
        text = "def f(x):\n"
        # A step, then a generation with an empty prompt (continue), then a step: answered in order.
        await ws.send(orjson.dumps({"inputs": {"tokens": encode(model, text).tolist()}, "id": "s1"}).decode())
        await ws.send(
            orjson.dumps({"type": "generate", "prompt": [], "max_tokens": 12, "temperature": 0, "id": 7}).decode()
        )
        await ws.send(orjson.dumps({"inputs": {"tokens": [5]}, "id": "s2"}).decode())
        assert (await recv())["id"] == "s1"
        tokens = [await recv() for _ in range(12)]
        assert {m["type"] for m in tokens} == {"token"} and {m["id"] for m in tokens} == {7}
        done = await recv()
        assert done["type"] == "done" and done["id"] == 7 and done["finish_reason"] == "length"
        ref, _, ref_logits = offline_greedy(model, encode(model, text), 12)
        assert done["tokens"] == ref == [m["token"] for m in tokens] and done["step"] == len(text) + 12
        np.testing.assert_allclose(done["logits"], ref_logits, atol=1e-4)
        after = await recv()
        assert (after["type"], after["id"], after["step"]) == ("result", "s2", len(text) + 13)
        # Cancel: stops at the next token boundary; the session holds exactly the streamed tokens.
        await ws.send(orjson.dumps({"type": "generate", "prompt": "x", "max_tokens": 1500, "id": "g"}).decode())
        streamed = [await recv() for _ in range(3)]
        await ws.send(orjson.dumps({"type": "cancel", "id": "g"}).decode())
        while (message := await recv())["type"] == "token":
            streamed.append(message)
        assert message["type"] == "done" and message["finish_reason"] == "cancelled" and message["id"] == "g"
        assert message["tokens"] == [m["token"] for m in streamed]
        assert message["step"] == len(text) + 13 + 1 + len(streamed) == streamed[-1]["step"]
        # Bad generate messages get an error with the id; the connection stays usable.
        await ws.send(orjson.dumps({"type": "generate", "prompt": "x", "temperature": -1, "id": "bad"}).decode())
        error = await recv()
        assert (error["type"], error["id"], error["status"]) == ("error", "bad", 422)
        await ws.send(orjson.dumps({"type": "nope", "id": "t"}).decode())
        assert (await recv())["status"] == 422
        await ws.send(orjson.dumps({"inputs": {"tokens": [1]}, "id": "s3"}).decode())
        assert (await recv())["step"] == message["step"] + 1


async def test_concurrent_generations_share_batches_with_a_step(
    gen_server: LiveServer, http: httpx.AsyncClient, loaded: dict[str, RecurrentModel]
) -> None:
    model = loaded["charlm"]
    scheduler = app_state(gen_server.app).session_service().schedulers["charlm"]
    before = len(scheduler.generation_rows)
    ids = [await create(http) for _ in range(17)]
    prompts = [PROMPT[: 8 + i] for i in range(16)]

    async def step_meanwhile() -> dict[str, Any]:
        await asyncio.sleep(0.1)
        r = await http.post(f"/v1/sessions/{ids[16]}/step", json={"inputs": {"tokens": encode(model, "ab").tolist()}})
        assert r.status_code == 200, r.text
        return dict(r.json())

    stepping = asyncio.ensure_future(step_meanwhile())
    runs = await asyncio.gather(
        *(generate(http, sid, prompt=p, max_tokens=20, temperature=0) for sid, p in zip(ids, prompts, strict=False))
    )
    stepped = await stepping
    assert max(list(scheduler.generation_rows)[before:]) > 1, "generations never shared a batch"
    for prompt, events in zip(prompts, runs, strict=True):
        assert events[-1][1]["tokens"] == offline_greedy(model, encode(model, prompt), 20)[0]
    ref = model.run({"tokens": encode(model, "ab")[None]}, np.ones((1, 2), bool), model.contract.initial_states(1))
    assert stepped["step"] == 2
    np.testing.assert_allclose(np.asarray(stepped["outputs"]["logits"]), ref.outputs["logits"][0], atol=1e-5)
