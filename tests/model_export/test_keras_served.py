"""A ``stateful=True`` Keras model called chunk by chunk equals served sessions stepping the same
chunks through the running service (real uvicorn, real Redis, HTTP), two sessions side by side."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson

from model_export.keras import convert, import_keras
from model_export.keras_verify import stateful_twin
from service.engine.model import RecurrentModel
from tests.live_server import live_server
from tests.redis_fixture import RedisServer

keras = import_keras()
layers = keras.layers


def stateful_model() -> Any:
    keras.utils.set_random_seed(11)
    bias = "random_normal"
    return keras.Sequential(
        [
            keras.Input(batch_shape=(1, None, 3), name="features"),
            layers.Masking(-1.0),
            layers.GRU(4, return_sequences=True, stateful=True, bias_initializer=bias, name="gru"),
            layers.GRU(4, return_sequences=True, stateful=True, reset_after=False, bias_initializer=bias, name="gru0"),
            layers.LSTM(5, return_sequences=True, stateful=True, bias_initializer=bias, name="lstm"),
            layers.SimpleRNN(3, return_sequences=True, stateful=True, bias_initializer=bias, name="rnn"),
            layers.TimeDistributed(layers.Dense(2, activation="sigmoid"), name="y"),
        ]
    )


def keras_states(model: Any) -> dict[str, np.ndarray]:
    out = {}
    for layer in model.layers:
        for key, state in zip(("h", "c"), getattr(layer, "states", None) or (), strict=False):
            out[f"{layer.name}_{key}0"] = np.asarray(keras.ops.convert_to_numpy(state))[0]
    return out


async def test_stateful_keras_chunks_equal_served_sessions(redis_server: RedisServer, tmp_path: Path) -> None:
    model = stateful_model()
    served = RecurrentModel(convert(model, tmp_path / "keras.onnx"), name="keras")
    rng = np.random.default_rng(0)
    sizes = {"a": [3, 1, 6, 2], "b": [5, 4, 1, 2]}
    data = {k: [rng.standard_normal((n, 3)).astype(np.float32) for n in v] for k, v in sizes.items()}
    data["a"][2][3] = -1.0  # a real step equal to the mask value: Keras carries over it, so does the service
    twins = {k: stateful_twin(model) for k in sizes}
    with live_server(redis_server.url, {"keras": served}) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            sids = {}
            for k in sizes:
                r = await client.post("/v1/sessions", json={"model": "keras"})
                assert r.status_code == 201, r.text
                sids[k] = r.json()["session_id"]

            async def step(k: str, x: np.ndarray) -> np.ndarray:
                body = orjson.dumps({"inputs": {"features": x.tolist()}})
                r = await client.post(f"/v1/sessions/{sids[k]}/step", content=body)
                assert r.status_code == 200, r.text
                return np.asarray(r.json()["outputs"]["y"], np.float32)

            for i in range(4):  # both sessions' chunks in flight together, batched side by side
                got = dict(zip(sizes, await asyncio.gather(*(step(k, data[k][i]) for k in sizes)), strict=True))
                for k in sizes:
                    expected = np.asarray(keras.ops.convert_to_numpy(twins[k](data[k][i][None], training=False)))
                    np.testing.assert_allclose(got[k], expected[0], atol=1e-5, rtol=0)
            for k in sizes:
                r = await client.get(f"/v1/sessions/{sids[k]}/state")
                archive = np.load(io.BytesIO(r.content), allow_pickle=False)
                expected_states = keras_states(twins[k])
                states = {f for f in archive.files if not f.startswith("carryover_")}  # the rest is metadata
                assert states == set(expected_states)
                for name, value in expected_states.items():
                    np.testing.assert_allclose(archive[name], value, atol=1e-5, rtol=0)
