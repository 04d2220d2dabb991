"""Torch versions of one timestep of the Keras layers that ``model_export.keras`` converts.

Nothing here imports Keras: each module is built from plain numpy weights already laid out the
way ``model_export.cells`` expects (PyTorch gate order, ``[out, in]`` matrices). ``KerasStepNet``
chains them into a ``StepCell`` the exporter traces like any other cell.

Keras's masking lives inside the step: a layer that makes a mask (``Masking``,
``Embedding(mask_zero=True)``) yields ``keep [B]`` for the step, and every recurrent layer after
it carries its state (and repeats its previous output, which is that carried ``h``) where
``keep`` is false, as Keras does. The exporter's own carry for padding comes on top of this.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model_export.cells import (
    CellSpec,
    DataSpec,
    StateSpec,
    gru_step,
    gru_step_reset_before,
    lstm_step,
    simple_rnn_step,
)

Activation = Callable[[Tensor], Tensor]

# The activations a converted Dense / Activation layer may use, by Keras's serialized name.
ACTIVATIONS: dict[str, Activation] = {
    "linear": lambda x: x,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "relu": torch.relu,
    "relu6": F.relu6,
    "softmax": lambda x: torch.softmax(x, dim=-1),
    "log_softmax": lambda x: torch.log_softmax(x, dim=-1),
    "softplus": F.softplus,
    "softsign": F.softsign,
    "elu": F.elu,
    "selu": F.selu,
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "exponential": torch.exp,
    "hard_sigmoid": lambda x: F.relu6(x + 3.0) / 6.0,
}

StepResult = tuple[Tensor, Tensor | None, tuple[Tensor, ...]]


def _param(array: np.ndarray) -> nn.Parameter:
    return nn.Parameter(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)), requires_grad=False)


class KerasStep(nn.Module):
    """One converted layer: ``forward(x, keep, states) -> (y, keep, new_states)`` for one step."""

    def state_specs(self) -> tuple[StateSpec, ...]:
        return ()

    def forward(self, x: Tensor, keep: Tensor | None, states: tuple[Tensor, ...]) -> StepResult:
        raise NotImplementedError


class DenseStep(KerasStep):
    """``Dense`` (also inside ``TimeDistributed``): ``act(x @ kernel + bias)``; passes the mask on."""

    def __init__(self, kernel: np.ndarray, bias: np.ndarray | None, activation: str) -> None:
        super().__init__()
        self.kernel = _param(kernel)
        self.bias = _param(bias if bias is not None else np.zeros(kernel.shape[1], np.float32))
        self.activation = ACTIVATIONS[activation]

    def forward(self, x: Tensor, keep: Tensor | None, states: tuple[Tensor, ...]) -> StepResult:
        return self.activation(x @ self.kernel + self.bias), keep, ()


class ActivationStep(KerasStep):
    """``Activation`` (and ``Dropout``, which is the identity at inference)."""

    def __init__(self, activation: str) -> None:
        super().__init__()
        self.activation = ACTIVATIONS[activation]

    def forward(self, x: Tensor, keep: Tensor | None, states: tuple[Tensor, ...]) -> StepResult:
        return self.activation(x), keep, ()


class EmbeddingStep(KerasStep):
    """``Embedding``: a table lookup; with ``mask_zero`` id 0 is a masked (carried) step."""

    def __init__(self, table: np.ndarray, mask_zero: bool) -> None:
        super().__init__()
        self.table = _param(table)
        self.mask_zero = mask_zero

    def forward(self, x: Tensor, keep: Tensor | None, states: tuple[Tensor, ...]) -> StepResult:
        return F.embedding(x, self.table), (x != 0) if self.mask_zero else keep, ()


class MaskingStep(KerasStep):
    """``Masking``: a step whose features all equal ``mask_value`` is masked; it is also zeroed."""

    def __init__(self, mask_value: float) -> None:
        super().__init__()
        self.mask_value = float(mask_value)

    def forward(self, x: Tensor, keep: Tensor | None, states: tuple[Tensor, ...]) -> StepResult:
        mask = torch.any(x != self.mask_value, dim=-1)
        return x * mask.unsqueeze(-1).to(x.dtype), mask, ()


RecurrentKind = Literal["simple", "gru", "gru_reset_before", "lstm"]


class RecurrentStep(KerasStep):
    """``SimpleRNN`` / ``GRU`` / ``LSTM`` with weights in PyTorch's layout and gate order.

    States are ``[B, units]`` (Keras's layout, batch axis 0), named ``{layer}_h0 -> {layer}_hn``
    (and ``{layer}_c0 -> {layer}_cn`` for an LSTM). The output is the new ``h``.
    """

    def __init__(
        self,
        name: str,
        kind: RecurrentKind,
        w_ih: np.ndarray,
        w_hh: np.ndarray,
        b_ih: np.ndarray,
        b_hh: np.ndarray | None,
        *,
        return_sequences: bool,
    ) -> None:
        super().__init__()
        self.layer_name = name
        self.kind = kind
        self.units = w_hh.shape[1]
        self.w_ih, self.w_hh, self.b_ih = _param(w_ih), _param(w_hh), _param(b_ih)
        self.b_hh = _param(b_hh if b_hh is not None else np.zeros_like(b_ih))
        self.return_sequences = return_sequences

    def state_specs(self) -> tuple[StateSpec, ...]:
        names = ("h", "c") if self.kind == "lstm" else ("h",)
        return tuple(StateSpec(f"{self.layer_name}_{n}0", f"{self.layer_name}_{n}n", (-1, self.units)) for n in names)

    def _cell(self, x: Tensor, states: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        if self.kind == "lstm":
            return lstm_step(x, states[0], states[1], self.w_ih, self.w_hh, self.b_ih, self.b_hh)
        if self.kind == "gru":
            return (gru_step(x, states[0], self.w_ih, self.w_hh, self.b_ih, self.b_hh),)
        if self.kind == "gru_reset_before":
            return (gru_step_reset_before(x, states[0], self.w_ih, self.w_hh, self.b_ih),)
        return (simple_rnn_step(x, states[0], self.w_ih, self.w_hh, self.b_ih),)

    def forward(self, x: Tensor, keep: Tensor | None, states: tuple[Tensor, ...]) -> StepResult:
        new = self._cell(x, states)
        if keep is not None:  # Keras's own mask: carry the state, repeat the last output (= h)
            carry = keep.unsqueeze(-1)
            new = tuple(torch.where(carry, n, old) for n, old in zip(new, states, strict=True))
        # Keras drops the mask after a layer that returns only its last output.
        return new[0], keep if self.return_sequences else None, new


class KerasStepNet(nn.Module):
    """The converted model: a chain of ``KerasStep``s, following the ``StepCell`` protocol."""

    def __init__(self, data_input: DataSpec, output_name: str, steps: Sequence[KerasStep], output_size: int) -> None:
        super().__init__()
        self.data_input = data_input
        self.output = DataSpec(output_name, (output_size,))
        self.steps = nn.ModuleList(steps)
        self._steps: list[KerasStep] = list(steps)  # the same modules, typed, in order
        self._state_counts = [len(s.state_specs()) for s in steps]

    def spec(self) -> CellSpec:
        states = tuple(spec for step in self._steps for spec in step.state_specs())
        return CellSpec(inputs=(self.data_input,), outputs=(self.output,), states=states)

    def initial_state(self, batch_size: int) -> tuple[Tensor, ...]:
        return tuple(torch.zeros(s.with_batch(batch_size)) for s in self.spec().states)

    def forward(self, x: Tensor, *states: Tensor) -> tuple[Tensor, ...]:
        """One timestep: ``x`` is ``[B, F]`` (or ``[B]`` token ids), each state ``[B, units]``."""
        keep: Tensor | None = None
        new_states: list[Tensor] = []
        offset = 0
        for step, count in zip(self._steps, self._state_counts, strict=True):
            x, keep, new = step(x, keep, tuple(states[offset : offset + count]))
            new_states.extend(new)
            offset += count
        return (x, *new_states)
