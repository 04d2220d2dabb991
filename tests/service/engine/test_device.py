"""The device thread: calls queue in submission order, ``busy`` counts them, the last one to end
wakes the idle callback, and a failing call fails only its own future."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from model_export.verify import random_inputs
from service.engine.batch import PaddedBatch, pad_batch
from service.engine.device import DeviceThread
from service.engine.model import RecurrentModel


def batch_of(model: RecurrentModel, steps: list[int], seed: int) -> PaddedBatch:
    rng = np.random.default_rng(seed)
    start = {k: v[0] for k, v in model.contract.initial_states(1).items()}
    return pad_batch(model.contract, [random_inputs(model.contract, n, rng) for n in steps], [start] * len(steps))


async def test_calls_queue_behind_each_other_and_the_last_wakes_the_idle_callback(
    loaded: dict[str, RecurrentModel],
) -> None:
    model = loaded["gru_stacked"]
    woke: list[int] = []
    device = DeviceThread(model, "test", on_idle=lambda: woke.append(device.busy))
    batches = [batch_of(model, steps, seed) for seed, steps in enumerate(([3, 1], [2], [4, 4, 1]))]
    try:
        calls = [device.submit(b) for b in batches]
        assert device.busy == 3  # all three queued at once, none waiting for the loop
        results = await asyncio.gather(*calls)
    finally:
        device.shutdown()
    assert device.busy == 0 and woke == [0]  # once, when the last call ended
    for b, (result, seconds) in zip(batches, results, strict=True):
        expected = model.run(b.inputs, b.mask, b.states, b.constants)
        assert seconds > 0
        for name, value in expected.outputs.items():
            np.testing.assert_array_equal(result.outputs[name], value)
        for name, value in expected.states.items():
            np.testing.assert_array_equal(result.states[name], value)


async def test_a_failing_call_fails_its_own_future_only(loaded: dict[str, RecurrentModel]) -> None:
    model = loaded["gru_stacked"]
    device = DeviceThread(model, "test", on_idle=lambda: None)
    good = batch_of(model, [2], 1)
    bad = PaddedBatch({"x": np.zeros((1, 2, 99), np.float32)}, good.mask, good.states)  # wrong feature size
    try:
        failing, fine = device.submit(bad), device.submit(good)
        with pytest.raises(Exception):  # noqa: B017 - ONNX Runtime's own error type
            await failing
        result, _ = await fine
    finally:
        device.shutdown()
    assert device.busy == 0 and result.outputs
