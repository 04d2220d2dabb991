"""``carryover inspect``'s guesses over bare signatures, and the warm-up's check of the output
shapes a graph leaves symbolic."""

from __future__ import annotations

from pathlib import Path

import pytest
from onnx import TensorProto, helper, save_model

from service.engine.inspect import inspect_signature, stem
from service.engine.model import RecurrentModel
from service.errors import ModelContractError
from tests.service.engine.test_contract import Arg, Signature

FLOAT, BOOL = "tensor(float)", "tensor(bool)"


@pytest.mark.parametrize(
    ("a", "b"), [("h0", "hn"), ("c_0", "c_n"), ("state_in", "state_out"), ("hidden", "hidden_out")]
)
def test_stems_pair_the_usual_names(a: str, b: str) -> None:
    assert stem(a) == stem(b)


def test_pairs_batch_axes_mask_and_form() -> None:
    seq = Signature(
        [Arg("x", FLOAT, ["B", "T", 4]), Arg("valid", BOOL, ["B", "T"]), Arg("h0", FLOAT, [2, "B", 8])],
        [Arg("y", FLOAT, ["B", "T", "d"]), Arg("hn", FLOAT, [2, "B", "k"])],
    )
    found = inspect_signature(seq)
    assert (found.pairs, found.mask, found.form) == ([("h0", "hn", 1)], "valid", "sequence")
    assert found.flags("m") == ["--state m=h0:hn:1", "--mask m=valid"]
    assert found.metadata()["inputs"] == ["x"] and found.metadata()["mask"] == "valid"
    step = Signature(
        [Arg("x", FLOAT, ["N", 8]), Arg("h", FLOAT, ["N", 8]), Arg("c", FLOAT, ["N", 8])],
        [Arg("out", FLOAT, ["N", 8]), Arg("h_out", FLOAT, ["N", 8]), Arg("c_out", FLOAT, ["N", 8])],
    )
    found = inspect_signature(step)
    assert (found.pairs, found.mask, found.form) == ([("h", "h_out", 0), ("c", "c_out", 0)], None, "step")
    unmasked = Signature([Arg("x", FLOAT, ["B", "T", 4]), Arg("h0", FLOAT, ["B", 8])], [Arg("hn", FLOAT, ["B", 8])])
    found = inspect_signature(unmasked)
    assert found.form is None and "no [B, T] mask input" in found.notes[0]


def _concat_model(path: Path, out_shape: list[str | int | None]) -> Path:
    """y = x, hn = h0 tiled by x's width (twice as wide as h0); shape inference cannot tell."""
    f = TensorProto.FLOAT
    ones = helper.make_tensor("one", TensorProto.INT64, [1], [1])
    nodes = [
        helper.make_node("Identity", ["x"], ["y"]),
        helper.make_node("Shape", ["x"], ["width"], start=2),
        helper.make_node("Concat", ["one", "width"], ["repeats"], axis=0),
        helper.make_node("Tile", ["h0", "repeats"], ["hn"]),
    ]
    graph = helper.make_graph(
        nodes,
        "concat",
        [
            helper.make_tensor_value_info("x", f, ["B", "T", 2]),
            helper.make_tensor_value_info("mask", TensorProto.BOOL, ["B", "T"]),
            helper.make_tensor_value_info("h0", f, ["B", 3]),
        ],
        [helper.make_tensor_value_info("y", f, ["B", "T", "D"]), helper.make_tensor_value_info("hn", f, out_shape)],
        [ones],
    )
    save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


@pytest.mark.parametrize("form", ["sequence", "step"])
def test_a_constant_is_found_by_its_mask(form: str) -> None:
    """``memory [B, L, D]`` beside ``memory_mask [B, L]``: a per-session constant, not data or the mask."""
    data = (
        [Arg("x", FLOAT, ["B", "T", 4]), Arg("mask", BOOL, ["B", "T"])]
        if form == "sequence"
        else [Arg("x", FLOAT, ["B", 4])]
    )
    graph = Signature(
        [*data, Arg("h", FLOAT, ["B", 8]), Arg("memory", FLOAT, ["B", "L", 6]), Arg("memory_mask", BOOL, ["B", "L"])],
        [Arg("y", FLOAT, ["B", "T", 3] if form == "sequence" else ["B", 3]), Arg("h_next", FLOAT, ["B", 8])],
    )
    found = inspect_signature(graph)
    assert (found.form, found.mask, found.pairs) == (form, "mask" if form == "sequence" else None, [("h", "h_next", 0)])
    assert found.flags()[-1] == "--constant memory:0:1:memory_mask"
    assert found.metadata()["inputs"] == ["x"]
    assert found.metadata()["constants"] == [
        {"input": "memory", "batch_axis": 0, "length_axis": 1, "mask": "memory_mask"}
    ]


def test_warm_up_names_a_state_output_whose_real_shape_disagrees(tmp_path: Path) -> None:
    path = _concat_model(tmp_path / "wide.onnx", ["B", "K"])
    with pytest.raises(ModelContractError, match=r"state output 'hn' has shape \[1, 6\]; its input 'h0' has \[1, 3\]"):
        RecurrentModel(path, state_pairs=["h0:hn"], warm_up=False)
    with pytest.raises(ModelContractError, match=r"state 'h0' has shape \['B', 3\] but its output 'hn' has \['B', 6\]"):
        RecurrentModel(_concat_model(tmp_path / "fixed.onnx", ["B", 6]), state_pairs=["h0:hn"])
