"""The sync client (``service/client/sync.py``) against a real server."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest

from model_export.verify import random_inputs
from service.client import CarryoverClientError, Client
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
        np.savez(buffer, **{k: v for k, v in state.items()})  # type: ignore[arg-type]
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
    with Client(
        api_server.url, backoff=0.01, http=httpx.Client(base_url=api_server.url, transport=transport)
    ) as client:
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


def test_generate_streams_greedy_tokens_and_follows_the_step(
    api_server: LiveServer, loaded: dict[str, RecurrentModel]
) -> None:
    from service.client import GeneratedToken, GenerationDone
    from tests.service.client.test_terminal import greedy

    with Client(api_server.url) as client:
        session = client.create("tokens")
        session.step({"tokens": [0, 1]})  # "ab"
        events = list(session.generate("c", max_tokens=5, temperature=0.0))
        tokens = [e for e in events if isinstance(e, GeneratedToken)]
        done = events[-1]
        assert isinstance(done, GenerationDone) and done.finish_reason == "length"
        assert done.text == "".join(t.text for t in tokens) == greedy(loaded["token_gru"], "abc", 5)
        assert [t.step for t in tokens] == [4, 5, 6, 7, 8] and session.step_count == 8 == session.info()["step"]
        session.step_count = 2  # a stale view: the generation must not start (409 before any token)
        with pytest.raises(CarryoverClientError) as info:
            next(iter(session.generate(max_tokens=3, temperature=0.0)))
        assert (info.value.status, info.value.code) == (409, "step_conflict")
        assert session.info()["step"] == 8
