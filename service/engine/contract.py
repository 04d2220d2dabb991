"""The recurrent-model contract (docs/contract.md): what a served model takes and returns.

Plain data, the parsing of what a model declares (``carryover`` metadata or ``--state`` pairs),
and ``build_contract``, which checks a declaration against a graph's signature. No ONNX Runtime
import: the signature is anything with ``get_inputs()``/``get_outputs()`` (an ORT session in
``model.py``), and every layer above (store, scheduler, sessions, transports) speaks only these
types.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from service.errors import ModelContractError

METADATA_KEY = "carryover"
Form = Literal["sequence", "step"]
Kind = Literal["features", "token_lm"]
Dim = int | str | None

_ORT_DTYPES: dict[str, Any] = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


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


class TensorArg(Protocol):
    """One graph input or output as ONNX Runtime describes it (``onnxruntime.NodeArg``)."""

    @property
    def name(self) -> str: ...

    @property
    def type(self) -> str: ...

    @property
    def shape(self) -> Sequence[Dim]: ...


class GraphSignature(Protocol):
    """A graph's inputs and outputs (an ``onnxruntime.InferenceSession`` is one)."""

    def get_inputs(self) -> Sequence[TensorArg]: ...

    def get_outputs(self) -> Sequence[TensorArg]: ...


def _dtype(ort_type: str, what: str) -> np.dtype[Any]:
    """The numpy dtype of an ORT type string such as ``tensor(float)``."""
    if ort_type not in _ORT_DTYPES:
        raise ModelContractError(f"{what} has unsupported type {ort_type}")
    dtype: np.dtype[Any] = np.dtype(_ORT_DTYPES[ort_type])
    return dtype


def _static_tail(name: str, shape: list[Dim], dynamic_axes: tuple[int, ...], what: str) -> tuple[int, ...]:
    """Check that ``dynamic_axes`` are dynamic and every other dim is fixed; return the fixed ones."""
    for axis in dynamic_axes:
        if axis >= len(shape):
            raise ModelContractError(f"{what} {name!r} has rank {len(shape)}; expected an axis {axis}")
        if isinstance(shape[axis], int):
            axis_name = "B" if axis == dynamic_axes[0] else "T"
            raise ModelContractError(
                f"{what} {name!r} axis {axis} ({axis_name}) is fixed to {shape[axis]}; it must be dynamic"
            )
    fixed = []
    for axis, d in enumerate(shape):
        if axis in dynamic_axes:
            continue
        if not isinstance(d, int):
            raise ModelContractError(f"{what} {name!r} axis {axis} is dynamic ({d!r}); only B and T may be")
        fixed.append(d)
    return tuple(fixed)


def declared_from_pairs(pairs: list[str], graph_inputs: list[str], graph_outputs: list[str]) -> DeclaredContract:
    """Operator-declared pairs (``--state h0:hn``) for a model without metadata: the mask is the
    input named ``mask`` (sequence form) or absent (step form); everything else is data."""
    states = [parse_state_pair(p) for p in pairs]
    mask = "mask" if "mask" in graph_inputs else None
    state_names = {s[0] for s in states} | {s[1] for s in states}
    return DeclaredContract(
        form="sequence" if mask else "step",
        kind="features",
        inputs=[n for n in graph_inputs if n not in state_names and n != mask],
        outputs=[n for n in graph_outputs if n not in state_names],
        mask=mask,
        states=states,
    )


def build_contract(declared: DeclaredContract, graph: GraphSignature) -> ModelContract:
    """Check ``declared`` against the graph's real inputs/outputs; errors name the tensor."""
    g_in = {i.name: i for i in graph.get_inputs()}
    g_out = {o.name: o for o in graph.get_outputs()}
    form = declared.form or ("sequence" if declared.mask else "step")
    lead = (0, 1) if form == "sequence" else (0,)
    if form == "sequence" and not declared.mask:
        raise ModelContractError("a sequence-form model must declare a 'mask' input")
    if form == "step" and declared.mask:
        raise ModelContractError(f"a step-form model has no mask, but {declared.mask!r} is declared")

    def data(names: list[str] | None, pool: dict[str, TensorArg], what: str) -> tuple[DataTensor, ...]:
        out = []
        for name in names or []:
            if name not in pool:
                raise ModelContractError(
                    f"{what} {name!r} is declared but is not a graph {what} (graph {what}s: {sorted(pool)})"
                )
            meta = pool[name]
            shape = _static_tail(name, list(meta.shape), lead, what)
            out.append(DataTensor(name, _dtype(meta.type, f"{what} {name!r}"), shape))
        return tuple(out)

    states = []
    for s_in, s_out, axis in declared.states:
        if s_in not in g_in:
            raise ModelContractError(f"state input {s_in!r} is not a graph input (graph inputs: {sorted(g_in)})")
        if s_out not in g_out:
            raise ModelContractError(f"state output {s_out!r} is not a graph output (graph outputs: {sorted(g_out)})")
        i_meta, o_meta = g_in[s_in], g_out[s_out]
        if i_meta.type != o_meta.type:
            raise ModelContractError(f"state {s_in!r} is {i_meta.type} but its output {s_out!r} is {o_meta.type}")
        if not 0 <= axis < len(i_meta.shape):
            raise ModelContractError(f"state {s_in!r}: batch_axis {axis} is outside its rank {len(i_meta.shape)}")
        shape = _static_tail(s_in, list(i_meta.shape), (axis,), "state input")
        out_shape = _static_tail(s_out, list(o_meta.shape), (axis,), "state output")
        if shape != out_shape:
            raise ModelContractError(
                f"state {s_in!r} has shape {list(i_meta.shape)} but its output {s_out!r} has {list(o_meta.shape)}"
            )
        states.append(StateTensor(s_in, s_out, _dtype(i_meta.type, f"state {s_in!r}"), shape, axis))
    inputs = data(declared.inputs, g_in, "input")
    outputs = data(declared.outputs, g_out, "output")
    mask_dtype = np.dtype(np.bool_)
    if declared.mask:
        if declared.mask not in g_in:
            raise ModelContractError(f"mask {declared.mask!r} is not a graph input (graph inputs: {sorted(g_in)})")
        m = g_in[declared.mask]
        _static_tail(declared.mask, list(m.shape), (0, 1), "mask")
        if len(m.shape) != 2 or m.type not in ("tensor(bool)", "tensor(float)"):
            raise ModelContractError(f"mask {declared.mask!r} must be [B, T] bool or float32, not {m.type} {m.shape}")
        mask_dtype = _dtype(m.type, "mask")
    covered = {t.name for t in inputs} | {s.input for s in states} | {declared.mask}
    if extra := sorted(set(g_in) - covered):
        raise ModelContractError(f"graph input {extra[0]!r} is not declared as data, mask or state")
    if declared.kind == "token_lm" and (len(inputs) != 1 or inputs[0].dtype.kind not in "iu" or inputs[0].shape):
        raise ModelContractError("a token_lm model takes exactly one integer input of shape [B, T]")
    if not states:
        raise ModelContractError("a recurrent model needs at least one state pair")
    return ModelContract(
        form, declared.kind, inputs, outputs, tuple(states), declared.mask, mask_dtype, declared.vocab, declared.unk_id
    )
