"""Recurrent cells that follow carryover's export protocol.

The protocol (see ``StepCell``) is the smallest thing a user has to write to serve a recurrent
model: a ``torch.nn.Module`` whose ``forward`` takes one timestep of every data input plus every
state tensor and returns the step's data outputs followed by the new states, and a ``spec()``
describing names, per-timestep shapes and where the batch axis of each state is. The exporter
never traces a time loop: it exports this single step, and builds the time loop in ONNX itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class DataSpec:
    """One data input or output: ``shape`` is per timestep and excludes the batch axis."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32


@dataclass(frozen=True)
class StateSpec:
    """One state tensor. ``shape`` includes the batch axis, written as -1, at ``batch_axis``."""

    input: str
    output: str
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32

    @property
    def batch_axis(self) -> int:
        return self.shape.index(-1)

    def with_batch(self, batch_size: int) -> tuple[int, ...]:
        return tuple(batch_size if d == -1 else d for d in self.shape)


@dataclass(frozen=True)
class ConstantSpec:
    """A per-session constant input (e.g. the encoder outputs an attention decoder attends over),
    the same at every timestep. ``shape`` writes the batch axis as ``"B"`` and the per-session
    length as ``"L"``, e.g. ``("B", "L", 16)``; ``mask`` names the ``[B, L]`` bool input that
    marks the real positions of a padded batch (None: no length axis, a fixed shape)."""

    name: str
    shape: tuple[int | str, ...]
    mask: str | None = None
    dtype: torch.dtype = torch.float32

    @property
    def batch_axis(self) -> int:
        return self.shape.index("B")

    @property
    def length_axis(self) -> int | None:
        return self.shape.index("L") if "L" in self.shape else None


@dataclass(frozen=True)
class CellSpec:
    inputs: tuple[DataSpec, ...]
    outputs: tuple[DataSpec, ...]
    states: tuple[StateSpec, ...]
    kind: Literal["features", "token_lm"] = "features"
    vocab: str | list[str] | None = None
    unk_id: int | None = None
    extra: dict[str, object] = field(default_factory=dict)
    constants: tuple[ConstantSpec, ...] = ()


@runtime_checkable
class StepCell(Protocol):
    """What the exporter needs from a user's model.

    ``forward(*inputs, *states) -> (*outputs, *new_states)`` runs ONE timestep for a batch; a
    cell with per-session constants takes them last, each followed by its mask when it has one:
    ``forward(*inputs, *states, memory, memory_mask)``.
    ``initial_state(batch_size)`` returns the state a new session starts from (zeros in every
    bundled model; the runtime also starts sessions from zeros).
    """

    def spec(self) -> CellSpec: ...

    def initial_state(self, batch_size: int) -> tuple[Tensor, ...]: ...

    def __call__(self, *args: Tensor) -> tuple[Tensor, ...]: ...


def gru_step(x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor) -> Tensor:
    """One GRU step with PyTorch's gate order (r, z, n) and equations."""
    gi = x @ w_ih.t() + b_ih
    gh = h @ w_hh.t() + b_hh
    i_r, i_z, i_n = gi.chunk(3, dim=-1)
    h_r, h_z, h_n = gh.chunk(3, dim=-1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return (1 - z) * n + z * h


def lstm_step(
    x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor
) -> tuple[Tensor, Tensor]:
    """One LSTM step with PyTorch's gate order (i, f, g, o)."""
    gates = x @ w_ih.t() + b_ih + h @ w_hh.t() + b_hh
    i, f, g, o = gates.chunk(4, dim=-1)
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h_new = torch.sigmoid(o) * torch.tanh(c_new)
    return h_new, c_new


def gru_step_reset_before(x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor) -> Tensor:
    """One GRU step with the reset gate applied BEFORE the recurrent matmul (Keras's
    ``reset_after=False``, the original Cho et al. GRU): ``n = tanh(W_in x + b_in + W_hn (r * h))``.
    Gate order (r, z, n) as in ``gru_step``; there is no recurrent bias in this variant."""
    i_r, i_z, i_n = (x @ w_ih.t() + b_ih).chunk(3, dim=-1)
    w_hr, w_hz, w_hn = w_hh.chunk(3, dim=0)
    r = torch.sigmoid(i_r + h @ w_hr.t())
    z = torch.sigmoid(i_z + h @ w_hz.t())
    n = torch.tanh(i_n + (r * h) @ w_hn.t())
    return (1 - z) * n + z * h


def simple_rnn_step(x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, b: Tensor) -> Tensor:
    """One Elman (tanh) RNN step: ``h' = tanh(W_ih x + b + W_hh h)``."""
    return torch.tanh(x @ w_ih.t() + b + h @ w_hh.t())


class RecurrentNet(nn.Module):
    """A stacked GRU or LSTM with optional embedding / input projection and output head.

    The weights live in a standard ``nn.GRU`` / ``nn.LSTM`` (``batch_first``) so training uses
    PyTorch's fused kernels (``forward_sequence``), while ``forward`` is the single-timestep
    cell the exporter needs, written with plain matmuls from the same parameters. States use
    PyTorch's ``[layers, B, hidden]`` layout, i.e. ``batch_axis = 1``.
    """

    def __init__(
        self,
        cell: Literal["gru", "lstm"] = "gru",
        input_size: int = 8,
        hidden_size: int = 32,
        num_layers: int = 1,
        *,
        vocab_size: int | None = None,
        embedding_dim: int | None = None,
        input_projection: int | None = None,
        output_size: int | None = None,
        vocab: str | list[str] | None = None,
        unk_id: int | None = None,
    ) -> None:
        super().__init__()
        self.cell = cell
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.vocab = vocab
        self.unk_id = unk_id
        self.token_input = vocab_size is not None
        self.input_size = input_size
        self.embedding: nn.Embedding | None = None
        self.projection: nn.Linear | None = None
        rnn_in = input_size
        if vocab_size is not None:
            self.embedding = nn.Embedding(vocab_size, embedding_dim or hidden_size)
            rnn_in = self.embedding.embedding_dim
        elif input_projection is not None:
            self.projection = nn.Linear(input_size, input_projection)
            rnn_in = input_projection
        rnn_cls = nn.GRU if cell == "gru" else nn.LSTM
        self.rnn = rnn_cls(rnn_in, hidden_size, num_layers=num_layers, batch_first=True)
        self.head = nn.Linear(hidden_size, output_size) if output_size is not None else None

    # -- the export protocol -------------------------------------------------------------
    def spec(self) -> CellSpec:
        state_shape = (self.num_layers, -1, self.hidden_size)
        states = [StateSpec("h0", "hn", state_shape)]
        if self.cell == "lstm":
            states.append(StateSpec("c0", "cn", state_shape))
        out_size = self.head.out_features if self.head is not None else self.hidden_size
        if self.token_input:
            inputs = (DataSpec("tokens", (), torch.int64),)
            outputs = (DataSpec("logits", (out_size,)),)
            return CellSpec(inputs, outputs, tuple(states), "token_lm", self.vocab, self.unk_id)
        return CellSpec((DataSpec("x", (self.input_size,)),), (DataSpec("y", (out_size,)),), tuple(states))

    def initial_state(self, batch_size: int) -> tuple[Tensor, ...]:
        h = torch.zeros(self.num_layers, batch_size, self.hidden_size)
        return (h,) if self.cell == "gru" else (h, torch.zeros_like(h))

    def _embed(self, x: Tensor) -> Tensor:
        if self.embedding is not None:
            embedded: Tensor = self.embedding(x)
            return embedded
        if self.projection is not None:
            return torch.tanh(self.projection(x))
        return x

    def forward(self, x: Tensor, *states: Tensor) -> tuple[Tensor, ...]:
        """One timestep: ``x`` is ``[B, F]`` (or ``[B]`` token ids), states ``[L, B, H]``."""
        inp = self._embed(x)
        new_h: list[Tensor] = []
        new_c: list[Tensor] = []
        for layer in range(self.num_layers):
            w = [getattr(self.rnn, f"{n}_l{layer}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            if self.cell == "gru":
                inp = gru_step(inp, states[0][layer], *w)
            else:
                inp, c = lstm_step(inp, states[0][layer], states[1][layer], *w)
                new_c.append(c)
            new_h.append(inp)
        out = self.head(inp) if self.head is not None else inp
        if self.cell == "gru":
            return out, torch.stack(new_h)
        return out, torch.stack(new_h), torch.stack(new_c)

    def forward_sequence(self, x: Tensor, *states: Tensor) -> tuple[Tensor, ...]:
        """Unmasked ``[B, T, ...]`` run with the fused kernel, for training."""
        inp = self._embed(x)
        if self.cell == "gru":
            out, h = self.rnn(inp, states[0] if states else None)
            new_states: tuple[Tensor, ...] = (h,)
        else:
            out, (h, c) = self.rnn(inp, (states[0], states[1]) if states else None)
            new_states = (h, c)
        y = self.head(out) if self.head is not None else out
        return (y, *new_states)
