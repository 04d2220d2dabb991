"""The recurrent-model contract (docs/contract.md): what a served model takes and returns.

Plain data and ``build_contract``, which checks a declaration (parsed by ``metadata.py`` from
the ``carryover`` metadata or the ``--state`` flags) against a graph's signature. No ONNX Runtime
import: the signature is anything with ``get_inputs()``/``get_outputs()`` (an ORT session in
``model.py``), and every layer above (store, scheduler, sessions, transports) speaks only these
types.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from service.engine.metadata import DeclaredConstant, DeclaredContract, Form, Kind
from service.errors import ModelContractError

Dim = int | str | None
LENGTH = -2  # a constant's per-session length dim (its length axis), in ``ConstantTensor.shape``
UNKNOWN = -1  # an output dim the graph leaves symbolic (e.g. after a Loop); resolved at warm-up

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
    """A data input or output; ``shape`` is per timestep (no B, no T axis). An output's dim may be
    ``UNKNOWN`` until the model's warm-up run has measured it."""

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
    initial: str | None = None  # a graph initializer every session starts from (else zeros)
    initial_value: np.ndarray | None = field(default=None, compare=False, repr=False)

    @functools.cached_property  # read for every row of every batch; np.prod is slow on tiny shapes
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def describe(self) -> dict[str, object]:
        return {
            "input": self.input,
            "output": self.output,
            "dtype": self.dtype.name,
            "shape": list(self.shape),
            "batch_axis": self.batch_axis,
        }


@dataclass(frozen=True)
class ConstantTensor:
    """A per-session constant input (e.g. the encoder outputs an attention decoder attends over).
    ``shape`` is one session's slice (batch axis removed) with ``LENGTH`` at its length axis;
    ``length_axis`` and ``batch_axis`` are graph axes. ``mask`` is the ``[B, L]`` input that
    marks the real positions of a batch padded along the length axis."""

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    batch_axis: int = 0
    length_axis: int | None = None
    mask: str | None = None
    mask_dtype: np.dtype[Any] = field(default_factory=lambda: np.dtype(np.bool_))

    @property
    def session_length_axis(self) -> int | None:
        """The length axis within one session's slice (the batch axis removed)."""
        if self.length_axis is None:
            return None
        return self.length_axis - (self.length_axis > self.batch_axis)

    def describe(self) -> dict[str, object]:
        shape: list[int | str] = ["L" if d == LENGTH else d for d in self.shape]
        out: dict[str, object] = {"name": self.name, "dtype": self.dtype.name, "shape": shape}
        out |= {"batch_axis": self.batch_axis, "length_axis": self.length_axis, "mask": self.mask}
        return out


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
    unmeasured: bool = False  # some output dim is symbolic in the graph: the warm-up must measure it
    constants: tuple[ConstantTensor, ...] = ()

    def input(self, name: str) -> DataTensor:
        return next(t for t in self.inputs if t.name == name)

    def initial_states(self, batch: int = 1) -> dict[str, np.ndarray]:
        """The state every session starts from (and returns to on reset), ``[B, ...]``: the
        state's learned initial value where it names one, else zeros."""
        return {
            s.input: np.zeros((batch, *s.shape), dtype=s.dtype)
            if s.initial_value is None
            else np.repeat(s.initial_value[None], batch, axis=0)
            for s in self.states
        }


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


def _static_tail(
    name: str, shape: list[Dim], dynamic_axes: tuple[int, ...], what: str, second: str = "T"
) -> tuple[int, ...]:
    """Check that ``dynamic_axes`` (B, then ``second``) are dynamic and every other dim is fixed;
    return the fixed ones."""
    for axis in dynamic_axes:
        if axis >= len(shape):
            raise ModelContractError(f"{what} {name!r} has rank {len(shape)}; expected an axis {axis}")
        if isinstance(shape[axis], int):
            axis_name = "B" if axis == dynamic_axes[0] else second
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


def _output_tail(name: str, shape: list[Dim], lead: tuple[int, ...], what: str) -> tuple[int, ...]:
    """An output's dims without its ``lead`` (B[, T]) axes, which must be dynamic. Other symbolic
    dims become ``UNKNOWN``: exporters leave them on ``Loop`` outputs; the warm-up measures them."""
    if len(shape) < len(lead) or not shape:
        raise ModelContractError(
            f"{what} {name!r} has rank {len(shape)} in the graph; expected at least {len(lead)} "
            "(a graph without output shapes needs ONNX shape inference first)"
        )
    for axis in lead:  # a fixed B or T shows a frozen export (e.g. a time loop traced at one T)
        if isinstance(shape[axis], int):
            axis_name = "B" if axis == lead[0] else "T"
            raise ModelContractError(
                f"{what} {name!r} axis {axis} ({axis_name}) is fixed to {shape[axis]}; it must be dynamic"
            )
    return tuple(d if isinstance(d, int) else UNKNOWN for axis, d in enumerate(shape) if axis not in lead)


def _fits(declared: tuple[int, ...], real: tuple[int, ...]) -> bool:
    """Whether ``real`` dims agree with ``declared`` ones, where ``UNKNOWN`` (either side) matches anything."""
    return len(declared) == len(real) and all(UNKNOWN in (d, r) or d == r for d, r in zip(declared, real, strict=True))


def resolve_outputs(contract: ModelContract, outputs: dict[str, tuple[int, ...]]) -> ModelContract:
    """``contract`` with its data outputs' shapes as measured (``outputs``: name -> per-step
    shape); a measured shape that disagrees with the graph's fixed dims is named."""
    resolved = []
    for t in contract.outputs:
        real = outputs[t.name]
        if not _fits(t.shape, real):
            raise ModelContractError(
                f"output {t.name!r} has per-step shape {list(real)} at run time; the graph declares {list(t.shape)}"
            )
        resolved.append(DataTensor(t.name, t.dtype, real))
    return replace(contract, outputs=tuple(resolved), unmeasured=False)


def _initial_value(
    state: str, name: str, shape: tuple[int, ...], dtype: np.dtype[Any], initializers: Mapping[str, np.ndarray]
) -> np.ndarray:
    """A learned initial state: an initializer of the state's shape without its batch axis."""
    if name not in initializers:
        raise ModelContractError(f"state {state!r}: its initial {name!r} is not an initializer of the graph")
    value = initializers[name]
    if value.shape != shape or value.dtype != dtype:
        raise ModelContractError(
            f"state {state!r}: its initial {name!r} is {value.dtype} {list(value.shape)}; "
            f"the state is {dtype} {list(shape)} (its shape without the batch axis)"
        )
    value = value.copy()
    value.flags.writeable = False
    return value


def _constant(c: DeclaredConstant, g_in: Mapping[str, TensorArg]) -> ConstantTensor:
    """Check one declared constant (and its mask) against the graph's inputs."""
    if c.input not in g_in:
        raise ModelContractError(f"constant {c.input!r} is not a graph input (graph inputs: {sorted(g_in)})")
    shape = list(g_in[c.input].shape)
    for what, axis in (("batch_axis", c.batch_axis), ("length_axis", c.length_axis)):
        if axis is not None and not 0 <= axis < len(shape):
            raise ModelContractError(f"constant {c.input!r}: {what} {axis} is outside its rank {len(shape)}")
    if c.length_axis == c.batch_axis:
        raise ModelContractError(f"constant {c.input!r}: length_axis and batch_axis must differ")
    dynamic = (c.batch_axis,) if c.length_axis is None else (c.batch_axis, c.length_axis)
    fixed = iter(_static_tail(c.input, shape, dynamic, "constant", "L"))  # B (and L) dynamic, the rest fixed
    tail = tuple(LENGTH if axis == c.length_axis else next(fixed) for axis in range(len(shape)) if axis != c.batch_axis)
    dtype = _dtype(g_in[c.input].type, f"constant {c.input!r}")
    if c.mask is None:
        return ConstantTensor(c.input, dtype, tail, c.batch_axis)
    if c.mask not in g_in:
        raise ModelContractError(f"constant {c.input!r}: its mask {c.mask!r} is not a graph input")
    m = g_in[c.mask]
    if len(m.shape) != 2 or m.type not in ("tensor(bool)", "tensor(float)"):
        raise ModelContractError(f"constant mask {c.mask!r} must be [B, L] bool or float32, not {m.type} {m.shape}")
    _static_tail(c.mask, list(m.shape), (0, 1), "constant mask", "L")
    return ConstantTensor(c.input, dtype, tail, c.batch_axis, c.length_axis, c.mask, _dtype(m.type, "mask"))


def build_contract(
    declared: DeclaredContract, graph: GraphSignature, initializers: Mapping[str, np.ndarray] | None = None
) -> ModelContract:
    """Check ``declared`` against the graph's real inputs/outputs (and a state's ``initial``
    against the graph's ``initializers``, name -> value); errors name the tensor."""
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
            if what == "input":
                shape = _static_tail(name, list(meta.shape), lead, what)
            else:
                shape = _output_tail(name, list(meta.shape), lead, what)
            out.append(DataTensor(name, _dtype(meta.type, f"{what} {name!r}"), shape))
        return tuple(out)

    states = []
    symbolic = False
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
        out_tail = _output_tail(s_out, list(o_meta.shape), (axis,), "state output")
        symbolic |= UNKNOWN in out_tail
        if not _fits(shape, out_tail):
            raise ModelContractError(
                f"state {s_in!r} has shape {list(i_meta.shape)} but its output {s_out!r} has {list(o_meta.shape)}"
            )
        dtype = _dtype(i_meta.type, f"state {s_in!r}")
        initial = declared.initials.get(s_in)
        value = None if initial is None else _initial_value(s_in, initial, shape, dtype, initializers or {})
        states.append(StateTensor(s_in, s_out, dtype, shape, axis, initial, value))
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
    constants = tuple(_constant(c, g_in) for c in declared.constants)
    claimed = [t.name for t in inputs] + [s.input for s in states] + [declared.mask]
    for c in constants:
        if c.name in claimed or c.mask in claimed:
            raise ModelContractError(f"constant {c.name!r} (or its mask) is also declared as data, mask or state")
    covered = {*claimed, *(c.name for c in constants), *(c.mask for c in constants)}
    if extra := sorted(set(g_in) - covered):
        raise ModelContractError(f"graph input {extra[0]!r} is not declared as data, mask or state")
    if declared.kind == "token_lm" and (len(inputs) != 1 or inputs[0].dtype.kind not in "iu" or inputs[0].shape):
        raise ModelContractError("a token_lm model takes exactly one integer input of shape [B, T]")
    if not states:
        raise ModelContractError("a recurrent model needs at least one state pair")
    symbolic |= any(UNKNOWN in t.shape for t in outputs)
    return ModelContract(
        form,
        declared.kind,
        inputs,
        outputs,
        tuple(states),
        declared.mask,
        mask_dtype,
        declared.vocab,
        declared.unk_id,
        unmeasured=symbolic,
        constants=constants,
    )
