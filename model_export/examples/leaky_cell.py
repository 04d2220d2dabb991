"""Example: export your own cell with the ``StepCell`` protocol.

A "leaky integrator" RNN with a state in the plain ``[B, H]`` layout (batch axis 0) and two
data outputs. Three things make a cell exportable:

1. ``forward(*inputs, *states) -> (*outputs, *new_states)`` computes ONE timestep for a batch;
2. ``spec()`` names the tensors, gives per-timestep shapes, and marks the state's batch axis
   with -1 in its shape;
3. ``initial_state(batch_size)`` returns the state a new session starts from (zeros).

Export and check it::

    python -m model_export.examples.leaky_cell /tmp/leaky.onnx
    carryover verify /tmp/leaky.onnx --torch-module model_export.examples.leaky_cell:build
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn

from model_export.cells import CellSpec, DataSpec, StateSpec
from model_export.export import export_cell


class LeakyCell(nn.Module):
    def __init__(self, input_size: int = 3, hidden_size: int = 5) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.inp = nn.Linear(input_size, hidden_size)
        self.rec = nn.Linear(hidden_size, hidden_size, bias=False)
        self.leak = nn.Parameter(torch.full((hidden_size,), 0.7))
        self.readout = nn.Linear(hidden_size, 1)

    def spec(self) -> CellSpec:
        return CellSpec(
            inputs=(DataSpec("features", (self.inp.in_features,)),),
            outputs=(DataSpec("score", (1,)), DataSpec("hidden", (self.hidden_size,))),
            states=(StateSpec("state_in", "state_out", (-1, self.hidden_size)),),
        )

    def initial_state(self, batch_size: int) -> tuple[Tensor, ...]:
        return (torch.zeros(batch_size, self.hidden_size),)

    def forward(self, features: Tensor, state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        leak = torch.sigmoid(self.leak)
        new = leak * state + (1 - leak) * torch.tanh(self.inp(features) + self.rec(state))
        return self.readout(new), new, new


def build() -> LeakyCell:
    """Deterministic weights, so the exported file and ``--torch-module`` agree."""
    torch.manual_seed(7)
    return LeakyCell()


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else "leaky.onnx"
    form = sys.argv[2] if len(sys.argv) > 2 else "sequence"
    print(export_cell(build(), target, "step" if form == "step" else "sequence"))
