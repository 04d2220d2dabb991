"""The invariant over both transports at once: 100+ sessions on one server, half stepping over
HTTP and half streaming over WebSockets, every one equal to its offline unpadded B = 1 run."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np

from model_export.verify import random_inputs
from service.engine.model import RecurrentModel
from tests.engines import assert_matches_offline
from tests.live_server import API_MODELS, LiveServer
from tests.service.api.test_http import concat, npz, outputs_of, step
from tests.service.api.test_ws import stream_session


async def http_session(client: httpx.AsyncClient, model: RecurrentModel, served: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    created = await client.post("/v1/sessions", json={"model": served})
    assert created.status_code == 201, created.text
    sid = created.json()["session_id"]
    chunks = [random_inputs(model.contract, int(n), rng) for n in rng.integers(1, 12, size=rng.integers(1, 6))]
    outs, done = [], 0
    for chunk in chunks:
        r = await step(client, sid, chunk, done if seed % 2 else None)
        assert r.status_code == 200, r.text
        done += len(next(iter(chunk.values())))
        outs.append(outputs_of(r))
    state = npz((await client.get(f"/v1/sessions/{sid}/state")).content)
    assert int(state["carryover_step"]) == done
    assert_matches_offline(
        model, concat(chunks), concat(outs), {s.input: state[s.input] for s in model.contract.states}
    )


async def test_half_http_half_websocket_all_equal_the_offline_run(
    api_server: LiveServer, loaded: dict[str, RecurrentModel]
) -> None:
    served = list(API_MODELS)
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=api_server.url, timeout=120, limits=limits) as client:
        over_http = [http_session(client, loaded[API_MODELS[served[i % 3]]], served[i % 3], i) for i in range(52)]
        over_ws = [
            stream_session(api_server, client, loaded[API_MODELS[served[i % 3]]], served[i % 3], seed=100 + i)
            for i in range(52)
        ]
        await asyncio.gather(*over_http, *over_ws)
