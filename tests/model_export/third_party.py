"""Models exported the way people export them, not by ``model_export``: no ``carryover``
metadata, names of the exporter's choosing, and the shapes each exporter leaves behind.

- ``gru_step`` / ``lstm_step``: a 2-layer ``nn.GRU`` / ``nn.LSTM`` run for one step, states
  ``[layers, B, H]``, legacy exporter (``dynamo=False``).
- ``cells_dynamo``: a ``GRUCell`` feeding an ``LSTMCell``, one step, the dynamo exporter.
- ``loop_float`` / ``loop_bool``: a ``torch.jit.script`` time loop over a 2-layer GRU with the
  carry written in (a float or a bool mask), legacy exporter: its outputs' feature dims are
  symbolic, as a ``Loop`` leaves them.

Each ``THIRD_PARTY`` entry has the module, the flags that serve it, and ``reference``, which runs
the torch module over a whole unpadded sequence (B = 1) for the parity checks.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from model_export.cells import gru_step

F, H = 4, 6


class GRUStep(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(F, H, num_layers=2, batch_first=True)
        self.head = nn.Linear(H, 3)

    def forward(self, x: Tensor, h0: Tensor) -> tuple[Tensor, Tensor]:
        y, hn = self.rnn(x.unsqueeze(1), h0)
        return self.head(y.squeeze(1)), hn


class LSTMStep(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(F, H, num_layers=2, batch_first=True)

    def forward(self, x: Tensor, h0: Tensor, c0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        y, (hn, cn) = self.rnn(x.unsqueeze(1), (h0, c0))
        return y.squeeze(1), hn, cn


class CellsStep(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRUCell(F, H)
        self.lstm = nn.LSTMCell(H, H)

    def forward(self, x: Tensor, g: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        g2 = self.gru(x, g)
        h2, c2 = self.lstm(g2, (h, c))
        return h2, g2, h2, c2


class LoopGRU(nn.Module):
    """A scripted time loop; ``mask`` is float or bool, the carry ``m * new + (1 - m) * old``."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.GRUCell(F, H)
        self.c2 = nn.GRUCell(H, H)
        self.head = nn.Linear(H, 3)

    def forward(self, x: Tensor, mask: Tensor, h0: Tensor) -> tuple[Tensor, Tensor]:
        ha = h0[0]
        hb = h0[1]
        ys: list[Tensor] = []
        for t in range(x.size(1)):
            m = mask[:, t].unsqueeze(-1).to(x.dtype)
            a = gru_step(x[:, t], ha, self.c1.weight_ih, self.c1.weight_hh, self.c1.bias_ih, self.c1.bias_hh)
            ha = m * a + (1 - m) * ha
            b = gru_step(ha, hb, self.c2.weight_ih, self.c2.weight_hh, self.c2.bias_ih, self.c2.bias_hh)
            hb = m * b + (1 - m) * hb
            ys.append(self.head(hb) * m)
        return torch.stack(ys, 1), torch.stack([ha, hb], 0)


Shapes = dict[str, tuple[int, ...]]
Reference = Callable[[np.ndarray], tuple[np.ndarray, dict[str, np.ndarray]]]


@dataclass(frozen=True)
class ThirdParty:
    module: nn.Module
    path: Path
    state: list[str]  # the --state pairs that serve it
    states: Shapes  # state input -> its shape in the graph's layout at B = 1
    reference: Reference  # x [T, F] -> y [T, ...], states
    mask: str | None = None  # the --mask flag, where the mask is not named "mask"


def _step_reference(module: nn.Module, states: Shapes, batch_axis: int) -> Reference:
    def run(x: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        state = [torch.zeros(shape) for shape in states.values()]
        ys = []
        with torch.no_grad():
            for t in range(len(x)):
                y, *state = module(torch.from_numpy(x[t : t + 1]), *state)
                ys.append(y.numpy()[0])
        return np.stack(ys), {k: np.moveaxis(v.numpy(), batch_axis, 0)[0] for k, v in zip(states, state, strict=True)}

    return run


def _loop_reference(module: nn.Module, mask_dtype: torch.dtype) -> Reference:
    def run(x: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        with torch.no_grad():
            y, hn = module(torch.from_numpy(x[None]), torch.ones(1, len(x), dtype=mask_dtype), torch.zeros(2, 1, H))
        return y.numpy()[0], {"h0": hn.numpy()[:, 0]}

    return run


def export_third_party(folder: Path) -> dict[str, ThirdParty]:
    """Export every kind into ``folder`` (small sizes; a few seconds in all)."""
    torch.manual_seed(11)
    out: dict[str, ThirdParty] = {}
    layered = {"x": {0: "B"}, "y": {0: "B"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gru = GRUStep().eval()
        torch.onnx.export(
            gru,
            (torch.randn(2, F), torch.zeros(2, 2, H)),
            str(folder / "gru_step.onnx"),
            dynamo=False,
            input_names=["x", "h0"],
            output_names=["y", "hn"],
            dynamic_axes={**layered, "h0": {1: "B"}, "hn": {1: "B"}},
        )
        shapes: Shapes = {"h0": (2, 1, H)}
        out["gru_step"] = ThirdParty(
            gru, folder / "gru_step.onnx", ["h0:hn:1"], shapes, _step_reference(gru, shapes, 1)
        )
        lstm = LSTMStep().eval()
        torch.onnx.export(
            lstm,
            (torch.randn(2, F), torch.zeros(2, 2, H), torch.zeros(2, 2, H)),
            str(folder / "lstm_step.onnx"),
            dynamo=False,
            input_names=["x", "h0", "c0"],
            output_names=["y", "hn", "cn"],
            dynamic_axes={**layered, "h0": {1: "B"}, "c0": {1: "B"}, "hn": {1: "B"}, "cn": {1: "B"}},
        )
        shapes = {"h0": (2, 1, H), "c0": (2, 1, H)}
        out["lstm_step"] = ThirdParty(
            lstm, folder / "lstm_step.onnx", ["h0:hn:1", "c0:cn:1"], shapes, _step_reference(lstm, shapes, 1)
        )
        cells = CellsStep().eval()
        batch = torch.export.Dim("batch", min=1)
        torch.onnx.export(
            cells,
            (torch.randn(2, F), torch.zeros(2, H), torch.zeros(2, H), torch.zeros(2, H)),
            str(folder / "cells_dynamo.onnx"),
            dynamo=True,
            verbose=False,
            input_names=["x", "g", "h", "c"],
            output_names=["y", "g_out", "h_out", "c_out"],
            dynamic_shapes=({0: batch}, {0: batch}, {0: batch}, {0: batch}),
        )
        shapes = {"g": (1, H), "h": (1, H), "c": (1, H)}
        out["cells_dynamo"] = ThirdParty(
            cells,
            folder / "cells_dynamo.onnx",
            ["g:g_out", "h:h_out", "c:c_out"],
            shapes,
            _step_reference(cells, shapes, 0),
        )
        for name, dtype, mask_name in (("loop_float", torch.float32, "mask"), ("loop_bool", torch.bool, "valid")):
            loop = LoopGRU().eval()
            torch.onnx.export(
                torch.jit.script(loop),
                (torch.randn(2, 5, F), torch.ones(2, 5, dtype=dtype), torch.zeros(2, 2, H)),
                str(folder / f"{name}.onnx"),
                dynamo=False,
                input_names=["x", mask_name, "h0"],
                output_names=["y", "hn"],
                dynamic_axes={
                    "x": {0: "B", 1: "T"},
                    mask_name: {0: "B", 1: "T"},
                    "h0": {1: "B"},
                    "y": {0: "B", 1: "T"},
                },
            )
            out[name] = ThirdParty(
                loop,
                folder / f"{name}.onnx",
                ["h0:hn:1"],
                {"h0": (2, 1, H)},
                _loop_reference(loop, dtype),
                None if mask_name == "mask" else mask_name,
            )
    return out
