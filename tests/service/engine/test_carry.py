"""The mask-carry builder: masked rows keep their state (carried, not reset, not advanced) and output zeros."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.engine.carry import STEP_MASK, Carried, add_carry, contract_carries, with_step_carry
from service.engine.contract import DataTensor, ModelContract, StateTensor

F = TensorProto.FLOAT


def step_cell() -> onnx.ModelProto:
    """One timestep: ``hn = tanh(h0 + x)`` with the state laid out ``[2, B, 3]`` (batch axis 1),
    ``y = 2 * hn[0]``, so ``y`` consumes the cell's own new state."""
    inputs = [helper.make_tensor_value_info("x", F, ["B", 3]), helper.make_tensor_value_info("h0", F, [2, "B", 3])]
    outputs = [helper.make_tensor_value_info("y", F, ["B", 3]), helper.make_tensor_value_info("hn", F, [2, "B", 3])]
    nodes = [
        helper.make_node("Add", ["h0", "x"], ["sum"]),
        helper.make_node("Tanh", ["sum"], ["hn"]),
        helper.make_node("Gather", ["hn", "zero_i"], ["first"], axis=0),
        helper.make_node("Mul", ["first", "two"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(np.array(0, np.int64), "zero_i"),
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
    ]
    graph = helper.make_graph(nodes, "cell", inputs, outputs, initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


CONTRACT = ModelContract(
    "step",
    "features",
    (DataTensor("x", np.dtype(np.float32), (3,)),),
    (DataTensor("y", np.dtype(np.float32), (3,)),),
    (StateTensor("h0", "hn", np.dtype(np.float32), (2, 3), batch_axis=1),),
)


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def test_contract_carries_guard_states_with_their_inputs_and_zero_outputs() -> None:
    assert contract_carries(CONTRACT) == [
        Carried("hn", 3, 1, keep="h0"),
        Carried("y", 2, 0, dtype=np.dtype(np.float32)),
    ]


def test_masked_rows_keep_their_state_and_output_zeros() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3)).astype(np.float32)
    h0 = rng.standard_normal((2, 4, 3)).astype(np.float32)
    mask = np.array([True, False, True, False])
    plain = run(step_cell(), {"x": x, "h0": h0})
    carried = with_step_carry(step_cell(), CONTRACT)
    onnx.checker.check_model(carried)
    assert [i.name for i in carried.graph.input][-1] == STEP_MASK
    got = run(carried, {"x": x, "h0": h0, STEP_MASK: mask})
    # live rows: exactly the cell's result (the carry sits after the cell, y saw the new state)
    np.testing.assert_array_equal(got["hn"][:, mask], plain["hn"][:, mask])
    np.testing.assert_array_equal(got["y"][mask], plain["y"][mask])
    # masked rows: the state is carried bit for bit, the output is zero
    np.testing.assert_array_equal(got["hn"][:, ~mask], h0[:, ~mask])
    assert not got["y"][~mask].any()


def test_an_all_masked_step_is_the_identity_on_state() -> None:
    h0 = np.full((2, 2, 3), 0.25, np.float32)
    got = run(
        with_step_carry(step_cell(), CONTRACT),
        {"x": np.ones((2, 3), np.float32), "h0": h0, STEP_MASK: np.array([0, 0], bool)},
    )
    np.testing.assert_array_equal(got["hn"], h0)


def test_add_carry_works_on_any_graph_with_its_own_mask_name() -> None:
    """The exporter's use: a graph whose values carry a prefix, with the mask appended last."""
    model = step_cell()
    add_carry(model.graph, "mask_t", [Carried("hn", 3, 1, keep="h0")])  # y left unguarded
    got = run(
        model, {"x": np.ones((1, 3), np.float32), "h0": np.zeros((2, 1, 3), np.float32), "mask_t": np.array([False])}
    )
    assert not got["hn"].any()
    assert got["y"].any()  # an unguarded output is the cell's own


def test_a_zeroed_value_needs_a_dtype() -> None:
    with pytest.raises(ValueError, match="no dtype"):
        add_carry(step_cell().graph, "m", [Carried("y", 2)])
