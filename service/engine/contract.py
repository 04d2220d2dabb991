"""The recurrent-model contract (DESIGN §1) as plain data: what a served model takes and returns.

Pure data and parsing, no ONNX Runtime: ``model.py`` fills it from a loaded graph, and every
layer above (store, scheduler, sessions, transports) speaks only these types.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from service.errors import ModelContractError

METADATA_KEY = "carryover"
Form = Literal["sequence", "step"]
Kind = Literal["features", "token_lm"]


@dataclass(frozen=True)
class DataTensor:
    """A data input or output; ``shape`` is per timestep (no B, no T axis)."""

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "dtype": self.dtype.name, "shape": ["T", *self.shape]}


@dataclass(frozen=True)
class StateTensor:
    """One state pair; ``shape`` is one session's slice (the batch axis removed)."""

    input: str
    output: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    batch_axis: int = 0

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def describe(self) -> dict[str, object]:
        return {
            "input": self.input,
            "output": self.output,
            "dtype": self.dtype.name,
            "shape": list(self.shape),
            "batch_axis": self.batch_axis,
        }


@dataclass(frozen=True)
class ModelContract:
    form: Form
    kind: Kind
    inputs: tuple[DataTensor, ...]
    outputs: tuple[DataTensor, ...]
    states: tuple[StateTensor, ...]
    mask: str | None = None
    mask_dtype: np.dtype[Any] = field(default_factory=lambda: np.dtype(np.bool_))
    vocab: tuple[str, ...] | None = None
    unk_id: int | None = None

    def input(self, name: str) -> DataTensor:
        return next(t for t in self.inputs if t.name == name)

    def initial_states(self, batch: int = 1) -> dict[str, np.ndarray]:
        """Zeros: the state every session starts from (and returns to on reset). ``[B, ...]``."""
        return {s.input: np.zeros((batch, *s.shape), dtype=s.dtype) for s in self.states}


@dataclass(frozen=True)
class DeclaredContract:
    """What the ``carryover`` metadata (or the operator's ``--state`` pairs) declares."""

    form: Form | None
    kind: Kind
    inputs: list[str] | None
    outputs: list[str] | None
    mask: str | None
    states: list[tuple[str, str, int]]
    vocab: tuple[str, ...] | None = None
    unk_id: int | None = None


def parse_state_pair(text: str) -> tuple[str, str, int]:
    """``IN:OUT`` or ``IN:OUT:BATCH_AXIS`` (e.g. ``h0:hn:1`` for PyTorch's ``[layers, B, H]``)."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not all(parts[:2]):
        raise ModelContractError(f"state pair {text!r} must be IN:OUT or IN:OUT:BATCH_AXIS")
    try:
        axis = int(parts[2]) if len(parts) == 3 else 0
    except ValueError:
        raise ModelContractError(f"state pair {text!r}: batch axis {parts[2]!r} is not an integer") from None
    return parts[0], parts[1], axis


def parse_metadata(raw: str) -> DeclaredContract:
    """Parse and type-check the ``carryover`` metadata JSON; errors name the field."""
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ModelContractError(f"metadata {METADATA_KEY!r} is not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise ModelContractError(f"metadata {METADATA_KEY!r} must be a JSON object")
    if meta.get("version", 1) != 1:
        raise ModelContractError(f"metadata version {meta.get('version')!r} is not supported (expected 1)")
    form = meta.get("form", "sequence")
    if form not in ("sequence", "step"):
        raise ModelContractError(f"metadata 'form' must be 'sequence' or 'step', not {form!r}")
    kind = meta.get("kind", "features")
    if kind not in ("features", "token_lm"):
        raise ModelContractError(f"metadata 'kind' must be 'features' or 'token_lm', not {kind!r}")
    for key in ("inputs", "outputs"):
        value = meta.get(key)
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise ModelContractError(f"metadata {key!r} must be a non-empty list of tensor names")
    states = meta.get("state")
    if not isinstance(states, list) or not states:
        raise ModelContractError("metadata 'state' must be a non-empty list of {input, output, batch_axis}")
    pairs: list[tuple[str, str, int]] = []
    for i, s in enumerate(states):
        if not isinstance(s, dict) or not isinstance(s.get("input"), str) or not isinstance(s.get("output"), str):
            raise ModelContractError(f"metadata state[{i}] must have string 'input' and 'output'")
        axis = s.get("batch_axis", 0)
        if not isinstance(axis, int) or isinstance(axis, bool):
            raise ModelContractError(f"metadata state[{i}] ({s['input']}): 'batch_axis' must be an integer")
        pairs.append((s["input"], s["output"], axis))
    mask = meta.get("mask")
    if mask is not None and not isinstance(mask, str):
        raise ModelContractError("metadata 'mask' must be a tensor name")
    vocab: tuple[str, ...] | None = None
    unk_id = meta.get("unk_id")
    if kind == "token_lm":
        raw_vocab = meta.get("vocab")
        if isinstance(raw_vocab, str) or (isinstance(raw_vocab, list) and all(isinstance(v, str) for v in raw_vocab)):
            vocab = tuple(raw_vocab)
        else:
            raise ModelContractError("token_lm metadata needs 'vocab': a string or a list of token strings")
        if not isinstance(unk_id, int) or not 0 <= unk_id < len(vocab):
            raise ModelContractError(f"token_lm metadata 'unk_id' must be an id in [0, {len(vocab)}), not {unk_id!r}")
    return DeclaredContract(form, kind, meta["inputs"], meta["outputs"], mask, pairs, vocab, unk_id)
