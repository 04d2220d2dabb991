"""The invariant of docs/contract.md for every exported test model, in both forms (hypothesis)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model_export.cells import RecurrentNet
from model_export.export import export_cell
from model_export.verify import Batch, Row, compare, random_inputs, run_schedule, unpadded_run
from service.engine.metadata import METADATA_KEY
from service.engine.model import RecurrentModel
from tests.conftest import Exported

MODELS = ["gru_stacked", "lstm", "lstm_stacked", "token_gru"]
FORMS = ["", "_step"]
TOL = 1e-5


@st.composite
def schedules(draw: st.DrawFn, lengths: list[int]) -> list[Batch]:
    """Any chunking of every sequence, in any padded batches: right/left padding, holes, extra
    width, and all-padding rows for sequences that are idle in that batch."""
    remaining = list(lengths)
    batches = []
    while any(remaining):
        pending = [i for i, n in enumerate(remaining) if n]
        chosen = draw(st.lists(st.sampled_from(pending), min_size=1, unique=True))
        sizes = [draw(st.integers(1, remaining[i])) for i in chosen]
        width = max(sizes) + draw(st.integers(0, 3))
        rows = []
        for i, size in zip(chosen, sizes, strict=True):
            layout = draw(st.sampled_from(["right", "left", "holes"]))
            if layout == "right":
                positions = tuple(range(size))
            elif layout == "left":
                positions = tuple(range(width - size, width))
            else:
                positions = tuple(sorted(draw(st.sets(st.integers(0, width - 1), min_size=size, max_size=size))))
            rows.append(Row(i, positions))
            remaining[i] -= size
        idle = [i for i in range(len(lengths)) if i not in chosen]
        if len(idle) > 0 and draw(st.booleans()):
            rows.append(Row(draw(st.sampled_from(idle)), ()))
        batches.append(Batch(width, tuple(draw(st.permutations(rows)))))
    return batches


@pytest.mark.parametrize("name", [m + f for m in MODELS for f in FORMS] + ["charlm"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_chunking_and_padding_equals_the_unpadded_run(
    loaded: dict[str, RecurrentModel], name: str, data: st.DataObject
) -> None:
    """GRU, LSTM, stacked, token models and the bundled char LM, in both forms where exported."""
    model = loaded[name]
    lengths = data.draw(st.lists(st.integers(1, 12), min_size=1, max_size=4), label="lengths")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    seqs = [random_inputs(model.contract, n, rng) for n in lengths]
    refs = [unpadded_run(model, s) for s in seqs]
    schedule = data.draw(schedules(lengths), label="schedule")
    result = run_schedule(model, seqs, schedule)
    assert result.failures == []  # padded outputs are zero; all-padding rows keep state bytes
    out_err, state_err = compare(result, refs)
    assert out_err <= TOL and state_err <= TOL


@pytest.mark.parametrize("name", MODELS)
def test_step_and_sequence_forms_of_the_same_weights_agree(loaded: dict[str, RecurrentModel], name: str) -> None:
    rng = np.random.default_rng(1)
    seq_model, step_model = loaded[name], loaded[name + "_step"]
    inputs = {k: v[None].repeat(3, 0) for k, v in random_inputs(seq_model.contract, 9, rng).items()}
    mask = rng.random((3, 9)) < 0.6
    mask[:, 0] = True
    states = {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in seq_model.contract.initial_states(3).items()}
    a = seq_model.run(inputs, mask, states)
    b = step_model.run(inputs, mask, states)
    for k in a.outputs:
        np.testing.assert_allclose(a.outputs[k], b.outputs[k], atol=TOL)
    for k in a.states:
        np.testing.assert_allclose(a.states[k], b.states[k], atol=TOL)


@pytest.mark.parametrize("name", MODELS)
def test_onnx_matches_pytorch_step_by_step(loaded: dict[str, RecurrentModel], name: str) -> None:
    from model_export.verify import compare_with_torch
    from tests.models import build

    model = loaded[name]
    rng = np.random.default_rng(2)
    data = [random_inputs(model.contract, n, rng) for n in (1, 7, 23)]
    refs = [unpadded_run(model, d) for d in data]
    assert compare_with_torch(build(name), model.contract, data, refs) <= TOL


def test_fused_training_kernel_and_exported_step_agree() -> None:
    """The exported step is written from nn.GRU's own weights: it must match nn.GRU's output."""
    from tests.models import build

    net = build("gru_stacked")
    x = torch.randn(2, 6, 4)
    with torch.no_grad():
        y_seq, h_seq = net.forward_sequence(x, *net.initial_state(2))
        state: tuple[torch.Tensor, ...] = net.initial_state(2)
        for t in range(6):
            y, *rest = net(x[:, t], *state)
            state = tuple(rest)
    torch.testing.assert_close(y, y_seq[:, -1], atol=TOL, rtol=0)
    torch.testing.assert_close(state[0], h_seq, atol=TOL, rtol=0)


@pytest.mark.parametrize("steps", [1, 2, 5, 64, 300])
@pytest.mark.parametrize("batch", [1, 2, 17])
def test_dynamic_batch_and_time(loaded: dict[str, RecurrentModel], batch: int, steps: int) -> None:
    model = loaded["gru_stacked"]
    rng = np.random.default_rng(steps)
    x = rng.standard_normal((batch, steps, 4)).astype(np.float32)
    result = model.run({"x": x}, np.ones((batch, steps), bool), model.contract.initial_states(batch))
    assert result.outputs["y"].shape == (batch, steps, 3)
    assert result.states["h0"].shape == (batch, 2, 8)
    last = unpadded_run(model, {"x": x[-1]})
    np.testing.assert_allclose(result.outputs["y"][-1], last[0]["y"], atol=TOL)


def test_metadata_declares_the_contract(exported: dict[str, Exported]) -> None:
    seq = onnx.load(str(exported["lstm"].sequence))
    meta = json.loads(next(p.value for p in seq.metadata_props if p.key == METADATA_KEY))
    assert meta == {
        "version": 1,
        "form": "sequence",
        "kind": "features",
        "inputs": ["x"],
        "outputs": ["y"],
        "mask": "mask",
        "state": [{"input": "h0", "output": "hn", "batch_axis": 1}, {"input": "c0", "output": "cn", "batch_axis": 1}],
    }
    step = onnx.load(str(exported["token_gru"].step))
    meta = json.loads(next(p.value for p in step.metadata_props if p.key == METADATA_KEY))
    assert meta["form"] == "step" and "mask" not in meta
    assert meta["kind"] == "token_lm" and meta["vocab"] == "abcdefghij\ufffd" and meta["unk_id"] == 10
    assert {n.op_type for n in seq.graph.node} == {"Scan"}  # the time loop is ONNX's, never traced


def test_export_rejects_a_non_module(tmp_path: object) -> None:
    class NotAModule:
        def spec(self) -> None: ...

    with pytest.raises(TypeError, match=r"nn\.Module"):
        export_cell(NotAModule(), "/tmp/never.onnx")  # type: ignore[arg-type]


def test_single_layer_gru_without_head(tmp_path: object) -> None:
    import pathlib

    path = export_cell(RecurrentNet("gru", input_size=2, hidden_size=3), pathlib.Path(str(tmp_path)) / "m.onnx")
    model = RecurrentModel(path)
    assert [t.name for t in model.contract.outputs] == ["y"] and model.contract.outputs[0].shape == (3,)
