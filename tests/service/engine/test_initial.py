"""A learned initial state: an initializer named by the state's ``initial``, checked at load."""

from __future__ import annotations

import numpy as np
import pytest

from service.engine.contract import build_contract
from service.engine.metadata import parse_metadata
from service.errors import ModelContractError
from tests.service.engine.test_contract import LSTM_LIKE

META = (
    '{"inputs": ["x"], "outputs": ["y"], "mask": "mask", '
    '"state": [{"input": "h0", "output": "hn", "batch_axis": 1, "initial": "h0_init"}]}'
)


def test_new_sessions_start_from_the_initializer() -> None:
    value = np.arange(16, dtype=np.float32).reshape(2, 8)
    c = build_contract(parse_metadata(META), LSTM_LIKE, {"h0_init": value})
    assert c.states[0].initial == "h0_init"
    start = c.initial_states(3)["h0"]
    assert start.shape == (3, 2, 8) and all(np.array_equal(row, value) for row in start)


@pytest.mark.parametrize(
    ("initializers", "message"),
    [
        ({}, "its initial 'h0_init' is not an initializer of the graph"),
        ({"h0_init": np.zeros((8,), np.float32)}, r"is float32 \[8\]; the state is float32 \[2, 8\]"),
        ({"h0_init": np.zeros((2, 8), np.float64)}, r"is float64 \[2, 8\]"),
    ],
)
def test_a_wrong_initial_is_named(initializers: dict[str, np.ndarray], message: str) -> None:
    with pytest.raises(ModelContractError, match=message):
        build_contract(parse_metadata(META), LSTM_LIKE, initializers)
    with pytest.raises(ModelContractError, match="'initial' must name a graph initializer"):
        parse_metadata(META.replace('"h0_init"', "3"))
