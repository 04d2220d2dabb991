"""The masked carry as ONNX graph surgery: after one timestep of a cell, ``Where(mask_t, new, old)``.

One builder for both places a carry is built: the runtime extends a step-form model with it (so
the state stays on the device between timesteps), and the exporter ends the body of the sequence
form's ``Scan`` with it. A masked row keeps its old state (carried: not reset, not advanced) and
outputs zeros. ``onnx`` helper API only; no ONNX Runtime, no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from service.engine.contract import ModelContract

STEP_MASK = "carryover_mask_t"  # the [B] bool input the runtime adds to a step-form graph
BATCH_DIM = "B"


@dataclass(frozen=True)
class Carried:
    """One value the carry guards.

    ``name`` is a value the cell computes (a graph output); ``rank`` and ``batch_axis`` describe
    it with its batch axis. At masked rows it takes ``keep`` (a graph input: a state's old value)
    or, when ``keep`` is None, zeros of ``dtype`` (a data output).
    """

    name: str
    rank: int
    batch_axis: int = 0
    keep: str | None = None
    dtype: np.dtype[Any] | None = None


def add_carry(graph: onnx.GraphProto, mask: str, values: Sequence[Carried]) -> None:
    """Append a ``[B]`` bool input ``mask`` to ``graph`` and guard every value in ``values``.

    The cell's own value is renamed ``<name>/cell`` (its consumers inside the cell follow), and
    ``<name>`` becomes ``Where(Reshape(mask), <name>/cell, keep or 0)``, the mask reshaped to
    broadcast along the value's batch axis. Changes ``graph`` in place.
    """
    graph.input.append(helper.make_tensor_value_info(mask, TensorProto.BOOL, [BATCH_DIM]))
    renames = {v.name: f"{v.name}/cell" for v in values}
    for node in graph.node:
        node.output[:] = [renames.get(o, o) for o in node.output]
        node.input[:] = [renames.get(i, i) for i in node.input]
    for v in values:
        shape = np.ones(v.rank, dtype=np.int64)
        shape[v.batch_axis] = -1
        graph.initializer.append(numpy_helper.from_array(shape, f"{v.name}/mask_shape"))
        graph.node.append(helper.make_node("Reshape", [mask, f"{v.name}/mask_shape"], [f"{v.name}/mask"]))
        if v.keep is None:
            if v.dtype is None:
                raise ValueError(f"carried value {v.name!r} is zeroed at masked rows but has no dtype")
            graph.initializer.append(numpy_helper.from_array(np.zeros((), v.dtype), f"{v.name}/zero"))
        kept = v.keep if v.keep is not None else f"{v.name}/zero"
        graph.node.append(helper.make_node("Where", [f"{v.name}/mask", renames[v.name], kept], [v.name]))


def contract_carries(contract: ModelContract) -> list[Carried]:
    """What one timestep of ``contract``'s step graph guards: every state output (keeping its
    input) and every data output (zeroed)."""
    states = [Carried(s.output, len(s.shape) + 1, s.batch_axis, keep=s.input) for s in contract.states]
    return states + [Carried(t.name, len(t.shape) + 1, 0, dtype=t.dtype) for t in contract.outputs]


def with_step_carry(model: onnx.ModelProto, contract: ModelContract) -> onnx.ModelProto:
    """``model`` (a step-form graph, changed in place) extended with the carry for one timestep;
    its extra input is ``STEP_MASK``."""
    add_carry(model.graph, STEP_MASK, contract_carries(contract))
    return model
