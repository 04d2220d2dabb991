"""Load an ONNX recurrent model, check it against the contract, and run padded batches.

``RecurrentModel.run`` is the one entry point: numpy inputs ``[B, T, ...]``, mask ``[B, T]``,
states ``[B, ...]`` (one session's slice per row) → outputs ``[B, T, ...]`` and new states
``[B, ...]``. Sequence-form models run in one call; step-form models run ``T`` calls of a copy
of the step graph extended with the carry (``Where(mask_t, new, old)``), so on CUDA the state
never leaves the device between timesteps (IO binding feeds each step's state outputs to the
next step as inputs).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from service.engine.contract import (
    METADATA_KEY,
    DataTensor,
    DeclaredContract,
    ModelContract,
    StateTensor,
    parse_metadata,
    parse_state_pair,
)
from service.errors import ModelContractError

log = logging.getLogger(__name__)

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
PROVIDER_ALIASES = {
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
STEP_MASK = "carryover_mask_t"
Dim = int | str | None


@dataclass(frozen=True)
class BatchResult:
    outputs: dict[str, np.ndarray]  # [B, T, ...]
    states: dict[str, np.ndarray]  # [B, ...]


def fingerprint(path: str | Path) -> str:
    """sha256 over the model bytes and, in name order, every external-data file it references."""
    path = Path(path)
    digest = hashlib.sha256(path.read_bytes())
    for location in sorted(_external_locations(onnx.load_model(str(path), load_external_data=False))):
        digest.update(location.encode())
        digest.update((path.parent / location).read_bytes())
    return digest.hexdigest()


def _external_locations(model: onnx.ModelProto) -> set[str]:
    found: set[str] = set()

    def tensors(graph: onnx.GraphProto) -> None:
        for t in graph.initializer:
            if t.data_location == TensorProto.EXTERNAL:
                found.update(e.value for e in t.external_data if e.key == "location")
        for node in graph.node:
            for attr in node.attribute:
                for sub in (*([attr.g] if attr.HasField("g") else []), *attr.graphs):
                    tensors(sub)

    tensors(model.graph)
    return found


def _dtype(ort_type: str, what: str) -> np.dtype[Any]:
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


def build_contract(declared: DeclaredContract, session: ort.InferenceSession) -> ModelContract:
    """Check ``declared`` against the graph's real inputs/outputs; errors name the tensor."""
    g_in = {i.name: i for i in session.get_inputs()}
    g_out = {o.name: o for o in session.get_outputs()}
    form = declared.form or ("sequence" if declared.mask else "step")
    lead = (0, 1) if form == "sequence" else (0,)
    if form == "sequence" and not declared.mask:
        raise ModelContractError("a sequence-form model must declare a 'mask' input")
    if form == "step" and declared.mask:
        raise ModelContractError(f"a step-form model has no mask, but {declared.mask!r} is declared")

    def data(names: list[str] | None, pool: dict[str, Any], what: str) -> tuple[DataTensor, ...]:
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


@functools.cache
def cuda_library_error() -> str | None:
    """Why ORT's CUDA provider library cannot load here (None if it can).

    ``get_available_providers()`` lists CUDA whenever onnxruntime-gpu is installed, even with no
    GPU or CUDA libraries; loading the provider library first tells the truth without ORT's
    noisy failure log. ``get_providers()`` on the created session still has the last word.
    """
    library = Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    try:
        ctypes.CDLL(str(library))
    except OSError as e:
        return str(e)
    return None


def resolve_providers(requested: list[str] | None) -> list[str]:
    """Requested names (aliases ``cuda``/``cpu`` allowed), or CUDA-then-CPU when CUDA is usable."""
    if requested:
        return [PROVIDER_ALIASES.get(p.lower(), p) for p in requested]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        reason = cuda_library_error()
        if reason is None:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        log.info("CUDA execution provider not usable (%s); using CPU", reason)
    return ["CPUExecutionProvider"]


class RecurrentModel:
    """A loaded, validated model. Thread-safe for concurrent ``run`` calls (ORT sessions are)."""

    def __init__(
        self,
        path: str | Path,
        *,
        name: str | None = None,
        state_pairs: list[str] | None = None,
        providers: list[str] | None = None,
        intra_op_threads: int = 0,
        warm_up: bool = True,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelContractError(f"model file {str(self.path)!r} does not exist")
        self.name = name or self.path.stem
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self._options = options
        wanted = resolve_providers(providers)
        try:
            probe = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own Fail/InvalidGraph types for a broken file
            raise ModelContractError(f"model {self.name!r} cannot be loaded by ONNX Runtime: {e}") from e
        self.fingerprint = fingerprint(self.path)
        raw_meta = probe.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        if raw_meta is not None:
            declared = parse_metadata(raw_meta)
        elif state_pairs:
            declared = declared_from_pairs(
                state_pairs, [i.name for i in probe.get_inputs()], [o.name for o in probe.get_outputs()]
            )
        else:
            raise ModelContractError(
                f"model {self.name!r} has no {METADATA_KEY!r} metadata; name its state pairs (--state IN:OUT)"
            )
        self.contract = build_contract(declared, probe)
        if self.contract.form == "step":
            self.session = self._session(_with_carry(onnx.load_model(str(self.path)), self.contract), wanted)
        else:
            self.session = probe if wanted == ["CPUExecutionProvider"] else self._session(str(self.path), wanted)
        self.provider = self.session.get_providers()[0]
        self.device = "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"
        log.info(
            "model %s (%s form, %s) runs on %s; fingerprint %s",
            self.name,
            self.contract.form,
            self.contract.kind,
            self.provider,
            self.fingerprint[:12],
        )
        if warm_up:
            self._warm_up()

    def _session(self, model: str | onnx.ModelProto, providers: list[str]) -> ort.InferenceSession:
        source = model if isinstance(model, str) else model.SerializeToString()
        return ort.InferenceSession(source, self._options, providers=providers)

    def _warm_up(self) -> None:
        for batch, steps in ((1, 1), (2, 3)):
            inputs = {t.name: np.zeros((batch, steps, *t.shape), t.dtype) for t in self.contract.inputs}
            try:
                self.run(inputs, np.ones((batch, steps), bool), self.contract.initial_states(batch))
            except Exception as e:  # e.g. a graph whose time loop was frozen at export
                raise ModelContractError(
                    f"model {self.name!r} failed its warm-up run at B={batch}, T={steps}: {e}"
                ) from e

    def run(self, inputs: dict[str, np.ndarray], mask: np.ndarray, states: dict[str, np.ndarray]) -> BatchResult:
        """Run one padded batch. Rows where ``mask`` is False keep their state and output zeros."""
        c = self.contract
        feeds_states = {
            s.input: np.ascontiguousarray(np.moveaxis(states[s.input].astype(s.dtype, copy=False), 0, s.batch_axis))
            for s in c.states
        }
        feeds_inputs = {t.name: np.ascontiguousarray(inputs[t.name], dtype=t.dtype) for t in c.inputs}
        if c.form == "sequence":
            assert c.mask is not None
            feeds: dict[str, np.ndarray] = {
                **feeds_inputs,
                **feeds_states,
                c.mask: np.ascontiguousarray(mask, dtype=c.mask_dtype),
            }
            values = self._run_bound(feeds, {})
            outputs = {t.name: values[t.name].numpy() for t in c.outputs}
            new_states = {s.input: values[s.output].numpy() for s in c.states}
        else:
            outputs, new_states = self._run_steps(feeds_inputs, np.asarray(mask, dtype=bool), feeds_states)
        return BatchResult(outputs, {s.input: np.moveaxis(new_states[s.input], s.batch_axis, 0) for s in c.states})

    def _run_bound(
        self, feeds: dict[str, np.ndarray], device_feeds: dict[str, ort.OrtValue]
    ) -> dict[str, ort.OrtValue]:
        """One call with IO binding; outputs stay on the model's device until read."""
        binding = self.session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)
        for name, value in device_feeds.items():
            binding.bind_ortvalue_input(name, value)
        names = [o.name for o in self.session.get_outputs()]
        for name in names:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        return dict(zip(names, binding.get_outputs(), strict=True))

    def _run_steps(
        self, inputs: dict[str, np.ndarray], mask: np.ndarray, states: dict[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        c = self.contract
        batch, steps = mask.shape
        outputs = {t.name: np.zeros((batch, steps, *t.shape), t.dtype) for t in c.outputs}
        device_states: dict[str, ort.OrtValue] = {}
        host_states: dict[str, np.ndarray] = dict(states)
        for t in range(steps):
            feeds = {name: np.ascontiguousarray(x[:, t]) for name, x in inputs.items()}
            feeds[STEP_MASK] = np.ascontiguousarray(mask[:, t])
            feeds.update(host_states)
            values = self._run_bound(feeds, device_states)
            for o in c.outputs:
                outputs[o.name][:, t] = values[o.name].numpy()
            device_states = {s.input: values[s.output] for s in c.states}
            host_states = {}
        return outputs, {s.input: device_states[s.input].numpy() for s in c.states}


def _with_carry(model: onnx.ModelProto, contract: ModelContract) -> onnx.ModelProto:
    """A copy of a step-form graph whose outputs already apply the mask for one timestep."""
    g = model.graph
    g.input.append(helper.make_tensor_value_info(STEP_MASK, TensorProto.BOOL, ["B"]))
    renames = {s.output: (f"{s.output}/cell", s.batch_axis, len(s.shape) + 1, s.input) for s in contract.states}
    for t in contract.outputs:
        renames[t.name] = (f"{t.name}/cell", 0, len(t.shape) + 1, "")
    for node in g.node:
        node.output[:] = [renames[o][0] if o in renames else o for o in node.output]
        node.input[:] = [renames[i][0] if i in renames else i for i in node.input]
    for out_name, (cell_name, axis, rank, carried) in renames.items():
        shape = np.ones(rank, dtype=np.int64)
        shape[axis] = -1
        g.initializer.append(numpy_helper.from_array(shape, f"{out_name}/mask_shape"))
        g.node.append(helper.make_node("Reshape", [STEP_MASK, f"{out_name}/mask_shape"], [f"{out_name}/mask"]))
        if carried:
            other = carried
        else:
            dtype = next(t.dtype for t in contract.outputs if t.name == out_name)
            g.initializer.append(numpy_helper.from_array(np.zeros((), dtype), f"{out_name}/zero"))
            other = f"{out_name}/zero"
        g.node.append(helper.make_node("Where", [f"{out_name}/mask", cell_name, other], [out_name]))
    return model
