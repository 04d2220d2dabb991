"""Loading and validating models against the contract; fingerprints; providers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from service.engine.metadata import parse_state_pair
from service.engine.model import RecurrentModel, fingerprint
from service.errors import ModelContractError
from tests.conftest import Exported

F, B64, BOOL, F64 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL, TensorProto.DOUBLE
GOOD_META: dict[str, Any] = {
    "version": 1,
    "inputs": ["x"],
    "outputs": ["y"],
    "mask": "mask",
    "state": [{"input": "h0", "output": "hn", "batch_axis": 0}],
}


def toy_model(
    path: Path,
    *,
    meta: dict[str, Any] | str | None = GOOD_META,
    x: tuple[int, list[Any]] = (F, ["B", "T", 4]),
    mask: tuple[Any, ...] | None = ("B", "T"),
    h_out: str = "same",
    extra_input: bool = False,
) -> Path:
    """y = x, hn = h0 (or a variant that breaks one rule), with the given metadata."""
    inputs = [helper.make_tensor_value_info("x", x[0], x[1]), helper.make_tensor_value_info("h0", F, ["B", 3])]
    if mask is not None:
        inputs.append(helper.make_tensor_value_info("mask", BOOL, list(mask)))
    if extra_input:
        inputs.append(helper.make_tensor_value_info("temperature", F, [1]))
    nodes = [helper.make_node("Identity", ["x"], ["y"])]
    hn_type, hn_shape = F, list[str | int | None](["B", 3])
    if h_out == "same":
        nodes.append(helper.make_node("Identity", ["h0"], ["hn"]))
    elif h_out == "double":
        nodes.append(helper.make_node("Cast", ["h0"], ["hn"], to=F64))
        hn_type = F64
    elif h_out == "wider":
        nodes.append(helper.make_node("Concat", ["h0", "h0"], ["hn"], axis=1))
        hn_shape = ["B", 6]
    outputs = [helper.make_tensor_value_info("y", x[0], x[1]), helper.make_tensor_value_info("hn", hn_type, hn_shape)]
    model = helper.make_model(
        helper.make_graph(nodes, "toy", inputs, outputs), opset_imports=[helper.make_opsetid("", 17)], ir_version=8
    )
    if meta is not None:
        model.metadata_props.add(key="carryover", value=meta if isinstance(meta, str) else json.dumps(meta))
    onnx.save(model, str(path))
    return path


def meta(**changes: Any) -> dict[str, Any]:
    out = {**GOOD_META, **changes}
    return {k: v for k, v in out.items() if v is not None}


def test_a_valid_toy_model_loads_with_its_contract(tmp_path: Path) -> None:
    m = RecurrentModel(toy_model(tmp_path / "m.onnx"))
    c = m.contract
    assert (c.form, c.kind, c.mask) == ("sequence", "features", "mask")
    assert [(t.name, t.shape, t.dtype.name) for t in c.inputs] == [("x", (4,), "float32")]
    assert [(s.input, s.output, s.shape, s.batch_axis) for s in c.states] == [("h0", "hn", (3,), 0)]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"meta": "{not json"}, "metadata 'carryover' is not valid JSON"),
        ({"meta": "[1, 2]"}, "must be a JSON object"),
        ({"meta": meta(version=2)}, "metadata version 2 is not supported"),
        ({"meta": meta(form="loop")}, "'form' must be 'sequence' or 'step'"),
        ({"meta": meta(kind="image")}, "'kind' must be 'features' or 'token_lm'"),
        ({"meta": meta(inputs=[])}, "'inputs' must be a non-empty list"),
        ({"meta": meta(state=[])}, "'state' must be a non-empty list"),
        ({"meta": meta(state=[{"input": "h0"}])}, "state[0] must have string 'input' and 'output'"),
        ({"meta": meta(state=[{"input": "h0", "output": "hn", "batch_axis": "1"}])}, "'batch_axis' must be an integer"),
        (
            {"meta": meta(state=[{"input": "h0", "output": "hn", "batch_axis": 2}])},
            "batch_axis 2 is outside its rank 2",
        ),
        ({"meta": meta(inputs=["features"])}, "input 'features' is declared but is not a graph input"),
        ({"meta": meta(outputs=["logits"])}, "output 'logits' is declared but is not a graph output"),
        ({"meta": meta(state=[{"input": "c0", "output": "hn"}])}, "state input 'c0' is not a graph input"),
        ({"meta": meta(state=[{"input": "h0", "output": "cn"}])}, "state output 'cn' is not a graph output"),
        ({"meta": meta(mask=None)}, "a sequence-form model must declare a 'mask' input"),
        ({"meta": meta(mask="valid")}, "mask 'valid' is not a graph input"),
        ({"meta": meta(form="step")}, "a step-form model has no mask, but 'mask' is declared"),
        ({"mask": ("B", "T", 1)}, "mask 'mask' must be [B, T] bool or float32"),
        ({"h_out": "double"}, "state 'h0' is tensor(float) but its output 'hn' is tensor(double)"),
        ({"h_out": "wider"}, "state 'h0' has shape ['B', 3] but its output 'hn' has ['B', 6]"),
        ({"x": (F, [2, "T", 4])}, "input 'x' axis 0 (B) is fixed to 2; it must be dynamic"),
        ({"x": (F, ["B", 5, 4])}, "input 'x' axis 1 (T) is fixed to 5; it must be dynamic"),
        ({"x": (F, ["B", "T", "F"])}, "input 'x' axis 2 is dynamic ('F'); only B and T may be"),
        ({"x": (TensorProto.STRING, ["B", "T"])}, "input 'x' has unsupported type tensor(string)"),
        ({"extra_input": True}, "graph input 'temperature' is not declared as data, mask or state"),
        ({"meta": meta(kind="token_lm", vocab="abc", unk_id=2)}, "token_lm model takes exactly one integer input"),
        ({"meta": meta(kind="token_lm", unk_id=0)}, "token_lm metadata needs 'vocab'"),
        ({"meta": meta(kind="token_lm", vocab="abc", unk_id=3)}, "'unk_id' must be an id in [0, 3)"),
        ({"meta": None}, "has no 'carryover' metadata; name its state pairs (--state IN:OUT)"),
    ],
)
def test_every_contract_violation_is_named(tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ModelContractError) as info:
        RecurrentModel(toy_model(tmp_path / "bad.onnx", **kwargs))
    assert message in str(info.value)


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ModelContractError, match="does not exist"):
        RecurrentModel(tmp_path / "nope.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelContractError, match="cannot be loaded by ONNX Runtime"):
        RecurrentModel(tmp_path / "junk.onnx")


def test_operator_declared_state_pairs_serve_a_model_without_metadata(tmp_path: Path) -> None:
    path = toy_model(tmp_path / "plain.onnx", meta=None)
    c = RecurrentModel(path, state_pairs=["h0:hn"]).contract
    assert (c.form, c.mask, [t.name for t in c.inputs], [t.name for t in c.outputs]) == (
        "sequence",
        "mask",
        ["x"],
        ["y"],
    )
    step_path = toy_model(tmp_path / "plain_step.onnx", meta=None, mask=None, x=(F, ["B", 4]))
    assert RecurrentModel(step_path, state_pairs=["h0:hn:0"]).contract.form == "step"
    with pytest.raises(ModelContractError, match="state input 'h1' is not a graph input"):
        RecurrentModel(path, state_pairs=["h1:hn"])


@pytest.mark.parametrize("bad", ["h0", "h0:", ":hn", "h0:hn:x", "a:b:c:d"])
def test_state_pair_syntax(bad: str) -> None:
    with pytest.raises(ModelContractError, match="state pair"):
        parse_state_pair(bad)


def test_fingerprint_is_stable_and_covers_external_data(tmp_path: Path, exported: dict[str, Exported]) -> None:
    src = exported["gru_stacked"].sequence
    copy = tmp_path / "copy.onnx"
    shutil.copy(src, copy)
    assert fingerprint(src) == fingerprint(copy) == RecurrentModel(copy).fingerprint
    assert len(fingerprint(src)) == 64 and fingerprint(src) != fingerprint(exported["gru_stacked"].step)

    model = onnx.load(str(src))
    ext = tmp_path / "ext"
    ext.mkdir()
    onnx.save_model(
        model,
        str(ext / "m.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="m.weights",
        size_threshold=100,
    )
    loaded = RecurrentModel(ext / "m.onnx")
    before = loaded.fingerprint
    data = bytearray((ext / "m.weights").read_bytes())
    data[0] ^= 0xFF  # same graph file, different weights
    (ext / "m.weights").write_bytes(bytes(data))
    assert fingerprint(ext / "m.onnx") != before
    x = np.ones((1, 2, 4), np.float32)
    np.testing.assert_allclose(  # external data really is used by the runtime
        loaded.run({"x": x}, np.ones((1, 2), bool), loaded.contract.initial_states(1)).outputs["y"],
        RecurrentModel(src).run({"x": x}, np.ones((1, 2), bool), loaded.contract.initial_states(1)).outputs["y"],
        atol=1e-6,
    )


def test_the_session_confirms_the_provider(exported: dict[str, Exported]) -> None:
    m = RecurrentModel(exported["lstm"].sequence, providers=["cpu"], intra_op_threads=1)
    assert m.provider == "CPUExecutionProvider" and m.device == "cpu"
    auto = RecurrentModel(exported["lstm"].sequence)  # confirmed by the session, not by availability
    assert auto.provider == auto.session.get_providers()[0]
    assert auto.device == ("cuda" if auto.provider == "CUDAExecutionProvider" else "cpu")


def test_float_mask_models_are_fed_a_float_mask(tmp_path: Path) -> None:
    path = tmp_path / "fm.onnx"
    inputs = [
        helper.make_tensor_value_info("x", F, ["B", "T", 2]),
        helper.make_tensor_value_info("mask", F, ["B", "T"]),
        helper.make_tensor_value_info("h0", F, ["B", 2]),
    ]
    nodes = [
        helper.make_node("Unsqueeze", ["mask", "axis"], ["m3"]),
        helper.make_node("Mul", ["x", "m3"], ["y"]),
        helper.make_node("Identity", ["h0"], ["hn"]),
    ]
    graph = helper.make_graph(
        nodes,
        "fm",
        inputs,
        [helper.make_tensor_value_info("y", F, ["B", "T", 2]), helper.make_tensor_value_info("hn", F, ["B", 2])],
        initializer=[onnx.numpy_helper.from_array(np.array([2], np.int64), "axis")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    model.metadata_props.add(key="carryover", value=json.dumps(GOOD_META))
    onnx.save(model, str(path))
    m = RecurrentModel(path)
    assert m.contract.mask_dtype == np.float32
    out = m.run({"x": np.ones((1, 3, 2), np.float32)}, np.array([[True, False, True]]), m.contract.initial_states(1))
    assert out.outputs["y"][0, :, 0].tolist() == [1.0, 0.0, 1.0]


SPINNING = "session.intra_op.allow_spinning"


@pytest.mark.parametrize("name", ["gru_stacked", "gru_stacked_step", "lstm", "lstm_step"])
def test_tiny_calls_run_on_a_spinning_idle_session_with_the_same_results(loaded: dict[str, Any], name: str) -> None:
    """``run(tiny=True)`` (the scheduler's inline calls) takes a second session on the CPU, two
    threads that spin (``idle_spin``; the main session never spins); a padded batch gives the
    same outputs and carried states on both."""
    model = loaded[name]
    if model.device == "cpu":
        assert model._tiny_session is not model.session
        tiny_options, main_options = model._tiny_session.get_session_options(), model.session.get_session_options()
        assert tiny_options.intra_op_num_threads == 2
        assert tiny_options.get_session_config_entry(SPINNING) == "1"
        assert main_options.get_session_config_entry(SPINNING) == "0"
    rng = np.random.default_rng(3)
    c = model.contract
    inputs = {t.name: rng.standard_normal((3, 4, *t.shape)).astype(t.dtype) for t in c.inputs}
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]], bool)  # ragged, and a row of padding only
    states = {s.input: rng.standard_normal((3, *s.shape)).astype(s.dtype) for s in c.states}
    main, tiny = model.run(inputs, mask, states), model.run(inputs, mask, states, tiny=True)
    for k in main.outputs:
        np.testing.assert_allclose(tiny.outputs[k], main.outputs[k], atol=1e-6)
    for k in main.states:
        np.testing.assert_allclose(tiny.states[k], main.states[k], atol=1e-6)
    for k, v in states.items():  # the all-padding row carried its state on the tiny session too
        np.testing.assert_array_equal(tiny.states[k][2], v[2])
    quiet = RecurrentModel(model.path, flags=None, idle_spin=False)  # one thread, no spinning
    quiet_options = quiet._tiny_session.get_session_options()
    assert quiet_options.intra_op_num_threads == 1 and quiet_options.get_session_config_entry(SPINNING) == "0"
    one_thread = RecurrentModel(model.path, flags=None, intra_op_threads=1, idle_spin=False)
    assert one_thread._tiny_session is one_thread.session  # already one quiet thread: no second copy


def test_no_second_session_for_a_big_model(exported: dict[str, Exported], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("service.engine.model.TINY_SESSION_MAX_BYTES", 1)  # every file is "big" now
    big = RecurrentModel(exported["lstm"].sequence)
    assert big._tiny_session is big.session
