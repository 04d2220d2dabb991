"""The ``model_export/examples`` models through a running service against the torch modules:
two data inputs per step (HTTP, WebSocket JSON, the client), a learned initial state (new
sessions and reset start from it) and per-session constants (the attention decoder)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import numpy as np
import orjson
import pytest
import torch

from model_export.examples import attention_decoder, event_gru
from service.client.sync import Client
from service.engine.model import RecurrentModel
from tests.live_server import LiveServer, live_server
from tests.make_models import committed_example
from tests.redis_fixture import RedisServer
from tests.service.api.test_http import npz
from tests.service.api.test_ws import open_stream, recv_json


@pytest.fixture(scope="module")
def events_server(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    folder = tmp_path_factory.mktemp("examples")
    sequence, step = event_gru.export_forms(folder / "events.onnx", folder / "events_step.onnx")
    models = {
        "events": RecurrentModel(sequence, name="events"),
        "events_step": RecurrentModel(step, name="events_step"),
    }
    with live_server(redis_server.url, models) as server:
        yield server


def torch_run(events: np.ndarray, minutes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The module's own step-by-step run from its learned h0: (logits [T, E], final h [H])."""
    cell = event_gru.build().eval()
    (h,) = cell.initial_state(1)
    out = []
    with torch.no_grad():
        for t in range(len(events)):
            logits, h = cell(torch.from_numpy(events[t : t + 1]), torch.from_numpy(minutes[t : t + 1]), h)
            out.append(logits.numpy()[0])
    return np.stack(out), h.numpy()[0]


def data(seed: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 16, steps).astype(np.int64), rng.exponential(10, (steps, 1)).astype(np.float32)


def body(events: np.ndarray, minutes: np.ndarray) -> bytes:
    return orjson.dumps({"inputs": {"event": events.tolist(), "minutes": minutes.tolist()}})


@pytest.mark.parametrize("model", ["events", "events_step"])
def test_two_inputs_and_learned_initial_state_over_http_and_client(events_server: LiveServer, model: str) -> None:
    h0 = event_gru.build().h0.detach().numpy()
    events, minutes = data(1, 13)
    ref_logits, ref_h = torch_run(events, minutes)
    with httpx.Client(base_url=events_server.url, timeout=30) as http:
        sid = http.post("/v1/sessions", json={"model": model}).json()["session_id"]
        np.testing.assert_array_equal(npz(http.get(f"/v1/sessions/{sid}/state").content)["h"], h0)
        logits = []
        for lo, hi in ((0, 5), (5, 13)):
            r = http.post(f"/v1/sessions/{sid}/step", content=body(events[lo:hi], minutes[lo:hi]))
            assert r.status_code == 200, r.text
            logits.append(np.asarray(r.json()["outputs"]["logits"], np.float32))
        np.testing.assert_allclose(np.concatenate(logits), ref_logits, atol=1e-5, rtol=0)
        np.testing.assert_allclose(npz(http.get(f"/v1/sessions/{sid}/state").content)["h"], ref_h, atol=1e-5, rtol=0)
        assert http.post(f"/v1/sessions/{sid}/reset").status_code in (200, 204)
        np.testing.assert_array_equal(npz(http.get(f"/v1/sessions/{sid}/state").content)["h"], h0)
    with Client(events_server.url) as client:
        session = client.create(model)
        first = session.step({"event": events[:6], "minutes": minutes[:6]})
        rest = session.step({"event": events[6:], "minutes": minutes[6:]})
        np.testing.assert_allclose(np.concatenate([first["logits"], rest["logits"]]), ref_logits, atol=1e-5, rtol=0)


async def test_two_inputs_over_websocket_json(events_server: LiveServer) -> None:
    events, minutes = data(2, 9)
    ref_logits, _ = torch_run(events, minutes)
    ws, _ = await open_stream(events_server, "/v1/stream?model=events")
    logits = []
    for lo, hi in ((0, 4), (4, 9)):
        await ws.send(body(events[lo:hi], minutes[lo:hi]).decode())
        message = await recv_json(ws)
        assert message["type"] == "result", message
        logits.append(np.asarray(message["outputs"]["logits"], np.float32))
    await ws.close()
    np.testing.assert_allclose(np.concatenate(logits), ref_logits, atol=1e-5, rtol=0)


def test_attention_decoder_through_the_service_equals_torch(redis_server: RedisServer) -> None:
    """The committed attention decoder, served, against the PyTorch module itself: sessions with
    memories of 3, 7 and 12 positions, their steps in different chunks, each equal to the
    module's own run of its whole sequence over its unpadded memory."""
    e = committed_example("attention_decoder")
    models = {"attn": RecurrentModel(e.sequence, name="attn"), "attn_step": RecurrentModel(e.step, name="attn_step")}
    rng = np.random.default_rng(11)
    with live_server(redis_server.url, models) as server, Client(server.url) as client:
        for model in models:
            sessions = []
            for n in (3, 7, 12):
                memory = rng.standard_normal((n, attention_decoder.MEMORY_DIM)).astype(np.float32)
                tokens = rng.integers(0, len(attention_decoder.VOCAB), 9)
                sessions.append((client.create(model, constants={"memory": memory}), memory, tokens))
            outputs: list[list[np.ndarray]] = [[] for _ in sessions]
            for lo, hi in ((0, 2), (2, 3), (3, 9)):  # one request per session per round
                for i, (session, _, tokens) in enumerate(sessions):
                    outputs[i].append(session.step({"tokens": tokens[lo:hi]})["logits"])
            for (session, memory, tokens), out in zip(sessions, outputs, strict=True):
                ref_logits, ref_h = attention_decoder.reference(torch.from_numpy(tokens), torch.from_numpy(memory))
                np.testing.assert_allclose(np.concatenate(out), ref_logits.numpy(), atol=1e-5, rtol=0)
                np.testing.assert_allclose(session.state()["h"], ref_h.numpy(), atol=1e-5, rtol=0)
