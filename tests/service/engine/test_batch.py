"""Batch assembly: splitting requests into chunks, padding rows into [B, T], slicing results back."""

from __future__ import annotations

import numpy as np

from model_export.verify import random_inputs
from service.engine.batch import chunk_steps, join_chunks, pad_batch, split_chunks, unpad_rows
from service.engine.contract import DataTensor, ModelContract, StateTensor
from service.engine.model import BatchResult, RecurrentModel

CONTRACT = ModelContract(
    "sequence",
    "features",
    (DataTensor("x", np.dtype(np.float32), (2, 2)), DataTensor("tok", np.dtype(np.int64), ())),
    (DataTensor("y", np.dtype(np.float32), (3,)),),
    (StateTensor("h0", "hn", np.dtype(np.float32), (2, 3), batch_axis=1),),
    mask="mask",
)


def chunk(steps: int, value: float) -> dict[str, np.ndarray]:
    return {"x": np.full((steps, 2, 2), value, np.float32), "tok": np.arange(1, steps + 1, dtype=np.int64)}


def test_split_and_join_round_trip() -> None:
    inputs = chunk(10, 1.0)
    inputs["x"] = np.arange(40, dtype=np.float32).reshape(10, 2, 2)
    parts = split_chunks(inputs, 4)
    assert [chunk_steps(p) for p in parts] == [4, 4, 2]
    assert all(np.shares_memory(p["x"], inputs["x"]) for p in parts)  # views, no copies
    joined = join_chunks(parts)
    assert joined.keys() == inputs.keys()
    for k in inputs:
        np.testing.assert_array_equal(joined[k], inputs[k])
    assert [chunk_steps(p) for p in split_chunks(chunk(3, 0.0), 8)] == [3]


def test_pad_batch_right_pads_with_zeros_and_a_false_mask() -> None:
    rows = [chunk(3, 1.0), chunk(1, 2.0), chunk(2, 3.0)]
    states = [{"h0": np.full((2, 3), i, np.float32)} for i in range(3)]
    batch = pad_batch(CONTRACT, rows, states)
    assert batch.mask.tolist() == [[True, True, True], [True, False, False], [True, True, False]]
    assert batch.inputs["x"].shape == (3, 3, 2, 2) and batch.inputs["x"].dtype == np.float32
    assert batch.inputs["tok"].tolist() == [[1, 2, 3], [1, 0, 0], [1, 2, 0]]
    assert batch.inputs["x"][1, :, 0, 0].tolist() == [2.0, 0.0, 0.0]
    # states stack along a new leading B axis (the model moves it to the state's batch axis)
    assert batch.states["h0"].shape == (3, 2, 3)
    assert batch.states["h0"][:, 0, 0].tolist() == [0.0, 1.0, 2.0]


def test_unpad_rows_keeps_each_rows_real_timesteps_and_state() -> None:
    result = BatchResult(
        {"y": np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3)},
        {"h0": np.stack([np.zeros((2, 3), np.float32), np.ones((2, 3), np.float32)])},
    )
    first, second = unpad_rows(result, [4, 1])
    assert first.outputs["y"].shape == (4, 3) and second.outputs["y"].shape == (1, 3)
    np.testing.assert_array_equal(second.outputs["y"], result.outputs["y"][1, :1])
    assert not first.states["h0"].any() and second.states["h0"].all()


def test_a_padded_batch_equals_each_row_run_alone(loaded: dict[str, RecurrentModel]) -> None:
    """The invariant at this layer: padding next to other rows changes nothing for a row."""
    model = loaded["gru_stacked"]
    rng = np.random.default_rng(7)
    rows = [random_inputs(model.contract, n, rng) for n in (5, 1, 3)]
    start = [{k: v[0] + 0.1 * i for k, v in model.contract.initial_states(1).items()} for i in range(3)]
    batch = pad_batch(model.contract, rows, start)
    together = unpad_rows(model.run(batch.inputs, batch.mask, batch.states), [chunk_steps(r) for r in rows])
    for row, state, got in zip(rows, start, together, strict=True):
        alone = pad_batch(model.contract, [row], [state])
        (want,) = unpad_rows(model.run(alone.inputs, alone.mask, alone.states), [chunk_steps(row)])
        for k, v in want.outputs.items():
            np.testing.assert_allclose(got.outputs[k], v, atol=1e-6, rtol=0)
        for k, v in want.states.items():
            np.testing.assert_allclose(got.states[k], v, atol=1e-6, rtol=0)
