"""Contract building checked against a bare graph signature (no ONNX Runtime needed)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pytest

from service.engine.contract import Dim, build_contract
from service.engine.metadata import declared_from_pairs, parse_metadata
from service.errors import ModelContractError


@dataclass(frozen=True)
class Arg:
    name: str
    type: str
    shape: Sequence[Dim]


@dataclass(frozen=True)
class Signature:
    inputs: list[Arg]
    outputs: list[Arg]

    def get_inputs(self) -> list[Arg]:
        return self.inputs

    def get_outputs(self) -> list[Arg]:
        return self.outputs


LSTM_LIKE = Signature(
    [
        Arg("x", "tensor(float)", ["B", "T", 4]),
        Arg("mask", "tensor(bool)", ["B", "T"]),
        Arg("h0", "tensor(float)", [2, "B", 8]),
    ],
    [Arg("y", "tensor(float)", ["B", "T", 8]), Arg("hn", "tensor(float)", [2, "B", 8])],
)


def test_declared_pairs_find_the_mask_and_the_data() -> None:
    declared = declared_from_pairs(["h0:hn:1"], ["x", "mask", "h0"], ["y", "hn"])
    assert (declared.form, declared.mask, declared.inputs, declared.outputs) == ("sequence", "mask", ["x"], ["y"])
    c = build_contract(declared, LSTM_LIKE)
    assert [(s.input, s.output, s.shape, s.batch_axis) for s in c.states] == [("h0", "hn", (2, 8), 1)]
    assert c.inputs[0].dtype == np.float32 and c.inputs[0].shape == (4,)
    step = declared_from_pairs(["h0:hn"], ["x", "h0"], ["y", "hn"])
    assert (step.form, step.mask) == ("step", None)


@pytest.mark.parametrize(
    ("x_shape", "message"),
    [
        (["B", 5, 4], "axis 1 \\(T\\) is fixed to 5"),
        (["B", "T", "F"], "axis 2 is dynamic"),
        (["B"], "has rank 1; expected an axis 1"),
    ],
)
def test_only_b_and_t_may_be_dynamic(x_shape: list[Dim], message: str) -> None:
    sig = Signature([Arg("x", "tensor(float)", x_shape), *LSTM_LIKE.inputs[1:]], LSTM_LIKE.outputs)
    with pytest.raises(ModelContractError, match=message):
        build_contract(declared_from_pairs(["h0:hn:1"], ["x", "mask", "h0"], ["y", "hn"]), sig)


def test_unsupported_dtypes_and_undeclared_inputs_are_named() -> None:
    sig = Signature([Arg("x", "tensor(string)", ["B", "T", 4]), *LSTM_LIKE.inputs[1:]], LSTM_LIKE.outputs)
    with pytest.raises(ModelContractError, match="input 'x' has unsupported type tensor\\(string\\)"):
        build_contract(declared_from_pairs(["h0:hn:1"], ["x", "mask", "h0"], ["y", "hn"]), sig)
    declared = parse_metadata(
        '{"inputs": ["x"], "outputs": ["y"], "mask": "mask", "state": [{"input": "h0", "output": "hn", '
        '"batch_axis": 1}]}'
    )
    extra = Signature([*LSTM_LIKE.inputs, Arg("temperature", "tensor(float)", [1])], LSTM_LIKE.outputs)
    with pytest.raises(ModelContractError, match="graph input 'temperature' is not declared"):
        build_contract(declared, extra)
