"""The Python client and ``carryover client`` against a real server."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from model_export.verify import random_inputs
from service.client import AsyncClient, CarryoverClientError, Client
from service.client.terminal import file_mode, interactive
from service.engine.model import RecurrentModel
from tests.engines import assert_matches_offline
from tests.live_server import LiveServer


class LoseFirstReply(httpx.HTTPTransport):
    """Delivers every request to the real server, but 'loses' the first step reply (as a
    timeout would), so the client must retry a request that DID land."""

    def __init__(self) -> None:
        super().__init__()
        self.lost = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if request.url.path.endswith("/step") and self.lost == 0:
            response.read()
            self.lost += 1
            raise httpx.ReadTimeout("reply lost", request=request)
        return response


def test_sync_client_round_trip(api_server: LiveServer, loaded: dict[str, RecurrentModel]) -> None:
    model = loaded["gru_stacked"]
    rng = np.random.default_rng(0)
    chunks = [random_inputs(model.contract, n, rng) for n in (2, 5, 1)]
    with Client(api_server.url) as client:
        assert {m["name"] for m in client.models()} == {"gru", "tokens", "lstm_step"}
        session = client.create("gru")
        outs = [session.step(c)["y"] for c in chunks]
        assert session.step_count == 8 and session.info()["step"] == 8
        state = session.state()
        assert_matches_offline(
            model, {"x": np.concatenate([c["x"] for c in chunks])}, {"y": np.concatenate(outs)}, {"h0": state["h0"]}
        )
        other = client.create("gru")
        buffer = io.BytesIO()
        np.savez(buffer, **{k: v for k, v in state.items()})
        other.load_state(buffer.getvalue())
        assert other.step_count == 8
        session.reset()
        assert session.info()["step"] == 0
        session.delete()
        with pytest.raises(CarryoverClientError) as info:
            session.info()
        assert info.value.status == 404 and info.value.code == "session_not_found"


def test_a_lost_reply_is_retried_exactly_once(api_server: LiveServer, loaded: dict[str, RecurrentModel]) -> None:
    model = loaded["gru_stacked"]
    x = random_inputs(model.contract, 4, np.random.default_rng(1))
    transport = LoseFirstReply()
    with Client(api_server.url, backoff=0.01) as client:
        client.http = httpx.Client(base_url=api_server.url, transport=transport)
        session = client.create("gru")
        y = session.step(x)["y"]  # first reply lost; the retry is answered as a replay
        assert transport.lost == 1 and session.step_count == 4
        assert session.info()["step"] == 4  # applied once, not twice
        assert_matches_offline(model, x, {"y": y}, {"h0": session.state()["h0"]})


def test_stream_pipelines_chunks_in_order(api_server: LiveServer, loaded: dict[str, RecurrentModel]) -> None:
    model = loaded["token_gru"]
    rng = np.random.default_rng(2)
    chunks = [{"tokens": rng.integers(0, 11, n).tolist()} for n in (3, 1, 4, 2, 5, 1, 1)]
    with Client(api_server.url) as client:
        session = client.create("tokens")
        replies = list(session.stream(chunks, in_flight=3))
        assert [r.step for r in replies] == list(np.cumsum([len(c["tokens"]) for c in chunks]))
        state = session.state()
        assert_matches_offline(
            model,
            {"tokens": np.concatenate([np.array(c["tokens"]) for c in chunks])},
            {"logits": np.concatenate([r.outputs["logits"] for r in replies])},
            {"h0": state["h0"]},
        )


async def test_async_client(api_server: LiveServer, loaded: dict[str, RecurrentModel]) -> None:
    model = loaded["gru_stacked"]
    rng = np.random.default_rng(3)
    chunks = [random_inputs(model.contract, n, rng) for n in (2, 3)]
    async with AsyncClient(api_server.url) as client:
        session = await client.create()
        first = await session.step(chunks[0])
        streamed = [r async for r in session.stream([chunks[1]])]
        state = await session.state()
        assert_matches_offline(
            model,
            {"x": np.concatenate([c["x"] for c in chunks])},
            {"y": np.concatenate([first["y"], streamed[0].outputs["y"]])},
            {"h0": state["h0"]},
        )
        again = await client.session(session.id)
        assert again.step_count == 5
        with pytest.raises(CarryoverClientError) as info:
            await session.step({"x": [[1.0, 2.0]]})
        assert info.value.status == 422 and "expects [T, 4]" in info.value.detail


def test_terminal_client_shows_predictions(api_server: LiveServer) -> None:
    with Client(api_server.url) as client:
        model: dict[str, Any] = next(m for m in client.models() if m["name"] == "tokens")
        session = client.create("tokens")
        out = io.StringIO()
        interactive(session, model, stdin=io.StringIO("abc\n:gen 5\n:reset\nzz\n:quit\n"), out=out)
        text = out.getvalue()
        assert f"session {session.id}" in text and "[step 4] next:" in text and "%" in text
        assert "reset: step 0" in text and "[step 3] next:" in text  # 'zz' + newline after the reset


def test_terminal_client_file_mode(api_server: LiveServer, tmp_path: Path, loaded: dict[str, RecurrentModel]) -> None:
    model = loaded["gru_stacked"]
    x = random_inputs(model.contract, 11, np.random.default_rng(4))["x"]
    np.save(tmp_path / "x.npy", x)
    with Client(api_server.url) as client:
        models = {m["name"]: m for m in client.models()}
        session = client.create("gru")
        assert file_mode(session, models["gru"], tmp_path / "x.npy", tmp_path / "y.npz", chunk=4) == 0
        y = np.load(tmp_path / "y.npz")["y"]
        assert_matches_offline(model, {"x": x}, {"y": y}, {"h0": session.state()["h0"]})
