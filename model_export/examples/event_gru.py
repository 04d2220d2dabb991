"""Example: two data inputs per step and a learned initial state.

An event model (the classic "event type and time since the last event" LSTM/GRU input): each
step takes an event id (``event``, int64, no feature axis) and the minutes since the previous
event (``minutes``, float32 ``[1]``), and predicts the next event's logits. The GRU's initial
state ``h0`` is a trained parameter, exported as the graph initializer ``h0_init`` and named by
the state's ``"initial"`` in the metadata: new sessions and ``reset`` start from it, not zeros.

    python -m model_export.examples.event_gru /tmp/events.onnx [sequence|step]
    carryover verify /tmp/events.onnx --torch-module model_export.examples.event_gru:build

Over HTTP a step carries both inputs, one entry per timestep each:
``{"inputs": {"event": [3, 1, 4], "minutes": [[0.5], [12.0], [3.25]]}}``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import onnx
import torch
from onnx import numpy_helper
from torch import Tensor, nn

from model_export.cells import CellSpec, DataSpec, StateSpec, gru_step
from model_export.export import export_both, export_cell
from service.engine.metadata import METADATA_KEY, Form

INITIAL = "h0_init"


class EventCell(nn.Module):
    def __init__(self, events: int = 16, embed: int = 4, hidden: int = 8) -> None:
        super().__init__()
        self.hidden = hidden
        self.embed = nn.Embedding(events, embed)
        self.cell = nn.GRUCell(embed + 1, hidden)
        self.h0 = nn.Parameter(torch.randn(hidden) * 0.5)  # trained with the rest
        self.head = nn.Linear(hidden, events)

    def spec(self) -> CellSpec:
        return CellSpec(
            inputs=(DataSpec("event", (), torch.int64), DataSpec("minutes", (1,))),
            outputs=(DataSpec("logits", (self.head.out_features,)),),
            states=(StateSpec("h", "h_next", (-1, self.hidden)),),
        )

    def initial_state(self, batch_size: int) -> tuple[Tensor, ...]:
        return (self.h0.detach().expand(batch_size, self.hidden).clone(),)

    def forward(self, event: Tensor, minutes: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        x = torch.cat([self.embed(event), torch.log1p(minutes)], dim=-1)
        c = self.cell
        new = gru_step(x, h, c.weight_ih, c.weight_hh, c.bias_ih, c.bias_hh)
        return self.head(new), new


def with_initial_state(path: str | Path, state: str, value: Tensor, name: str = INITIAL) -> Path:
    """Add ``value`` as the initializer ``name`` and make it ``state``'s ``"initial"`` in the metadata."""
    model = onnx.load_model(str(path))
    model.graph.initializer.append(numpy_helper.from_array(value.detach().numpy(), name))
    entry = next(p for p in model.metadata_props if p.key == METADATA_KEY)
    meta = json.loads(entry.value)
    for s in meta["state"]:
        if s["input"] == state:
            s["initial"] = name
    entry.value = json.dumps(meta)
    onnx.save_model(model, str(path))
    return Path(path)


def build() -> EventCell:
    """Deterministic weights, so the exported file and ``--torch-module`` agree."""
    torch.manual_seed(5)
    return EventCell()


def export(path: str | Path, form: Form = "sequence") -> Path:
    cell = build()
    return with_initial_state(export_cell(cell, path, form), "h", cell.h0)


def export_forms(sequence_path: str | Path, step_path: str | Path) -> tuple[Path, Path]:
    """Both forms from one trace."""
    cell = build()
    paths = export_both(cell, sequence_path, step_path)
    return with_initial_state(paths[0], "h", cell.h0), with_initial_state(paths[1], "h", cell.h0)


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else "events.onnx"
    print(export(target, "step" if sys.argv[2:] == ["step"] else "sequence"))
