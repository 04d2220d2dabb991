"""The async client (``service/client/aio.py``) against a real server: the same operations
and the same exactly-once retries as the sync client."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest

from model_export.verify import random_inputs
from service.client import AsyncClient, CarryoverClientError
from service.engine.model import RecurrentModel
from tests.engines import assert_matches_offline
from tests.live_server import LiveServer


class LoseFirstReply(httpx.AsyncHTTPTransport):
    """Delivers every request to the real server, but 'loses' the first step reply (as a
    timeout would), so the client must retry a request that DID land."""

    def __init__(self) -> None:
        super().__init__()
        self.lost = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await super().handle_async_request(request)
        if request.url.path.endswith("/step") and self.lost == 0:
            await response.aread()
            self.lost += 1
            raise httpx.ReadTimeout("reply lost", request=request)
        return response


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


async def test_async_info_state_round_trip(api_server: LiveServer, loaded: dict[str, RecurrentModel]) -> None:
    model = loaded["gru_stacked"]
    chunks = [random_inputs(model.contract, n, np.random.default_rng(5)) for n in (3, 4)]
    async with AsyncClient(api_server.url) as client:
        assert {m["name"] for m in await client.models()} == {"gru", "tokens", "lstm_step"}
        session = await client.create("gru")
        outs = [(await session.step(c))["y"] for c in chunks]
        info = await session.info()
        assert info["step"] == 7 and info["session_id"] == session.id and session.step_count == 7
        state = await session.state()
        other = await client.create("gru")
        buffer = io.BytesIO()
        np.savez(buffer, **state)  # type: ignore[arg-type]
        await other.load_state(buffer.getvalue())
        assert other.step_count == 7 and (await other.info())["step"] == 7
        assert_matches_offline(
            model,
            {"x": np.concatenate([c["x"] for c in chunks])},
            {"y": np.concatenate(outs)},
            {"h0": (await other.state())["h0"]},
        )
        await session.reset()
        assert session.step_count == 0 and (await session.info())["step"] == 0
        await session.delete()
        with pytest.raises(CarryoverClientError) as info_error:
            await session.info()
        assert info_error.value.status == 404 and info_error.value.code == "session_not_found"


async def test_async_lost_reply_is_retried_exactly_once(
    api_server: LiveServer, loaded: dict[str, RecurrentModel]
) -> None:
    model = loaded["gru_stacked"]
    x = random_inputs(model.contract, 4, np.random.default_rng(6))
    transport = LoseFirstReply()
    http = httpx.AsyncClient(base_url=api_server.url, transport=transport)
    async with AsyncClient(api_server.url, backoff=0.01, http=http) as client:
        session = await client.create("gru")
        y = (await session.step(x))["y"]  # first reply lost; the retry is answered as a replay
        assert transport.lost == 1 and session.step_count == 4
        assert (await session.info())["step"] == 4  # applied once, not twice
        assert_matches_offline(model, x, {"y": y}, {"h0": (await session.state())["h0"]})


async def test_async_generate_streams_the_same_tokens(
    api_server: LiveServer, loaded: dict[str, RecurrentModel]
) -> None:
    from service.client import GeneratedToken, GenerationDone
    from tests.service.client.test_terminal import greedy

    async with AsyncClient(api_server.url) as client:
        session = await client.create("tokens")
        events = [e async for e in session.generate([0, 1, 2], max_tokens=4, temperature=0.0)]
        assert [type(e) for e in events] == [GeneratedToken] * 4 + [GenerationDone]
        done = events[-1]
        assert isinstance(done, GenerationDone) and done.text == greedy(loaded["token_gru"], "abc", 4)
        assert session.step_count == 7 == (await session.info())["step"]
        await session.delete()
        with pytest.raises(CarryoverClientError) as info:
            await anext(aiter(session.generate(max_tokens=2, temperature=0.0)))
        assert (info.value.status, info.value.code) == (404, "session_not_found")
