"""Load an ONNX recurrent model, check it against the contract, and run padded batches.

``RecurrentModel.run`` is the one entry point: numpy inputs ``[B, T, ...]``, mask ``[B, T]``,
states ``[B, ...]`` (one session's slice per row) → outputs ``[B, T, ...]`` and new states
``[B, ...]``. Sequence-form models run in one call; step-form models run ``T`` calls of a copy
of the step graph extended with the carry (``Where(mask_t, new, old)``), so on CUDA the state
never leaves the device between timesteps (IO binding feeds each step's state outputs to the
next step as inputs). On the CPU a sequence-form call is a plain ``InferenceSession.run`` (IO
binding only pays where outputs can stay on a device), and tiny calls (``tiny=True``) go to a
second, one-thread session of the same graph.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, numpy_helper

from service.engine.carry import STEP_MASK, with_step_carry
from service.engine.constants import pad_constants, placeholder_constants
from service.engine.contract import build_contract, resolve_outputs
from service.engine.metadata import METADATA_KEY, FlagDeclaration, declared_from_pairs, parse_metadata
from service.engine.providers import resolve_providers
from service.errors import ModelContractError

log = logging.getLogger(__name__)
# The one-thread session for tiny calls is a second copy of the weights: only for models this
# small (a big model's B=1 call is not where a thread hand-off matters).
TINY_SESSION_MAX_BYTES = 64 * 1024 * 1024


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


def _initializers(path: Path, names: set[str]) -> dict[str, np.ndarray]:
    """The named initializers of the graph (learned initial states), as numpy arrays."""
    if not names:
        return {}
    graph = onnx.load_model(str(path)).graph
    return {t.name: numpy_helper.to_array(t) for t in graph.initializer if t.name in names}


def _graph_layout(shape: tuple[int, ...], batch_axis: int) -> list[int]:
    """A batch-first shape as the graph lays it out (the batch at ``batch_axis``)."""
    dims = list(shape[1:])
    dims.insert(batch_axis, shape[0])
    return dims


class RecurrentModel:
    """A loaded, validated model. Thread-safe for concurrent ``run`` calls (ORT sessions are)."""

    def __init__(
        self,
        path: str | Path,
        *,
        name: str | None = None,
        state_pairs: list[str] | None = None,
        flags: FlagDeclaration | None = None,
        providers: list[str] | None = None,
        intra_op_threads: int = 0,
        idle_spin: bool = True,
        warm_up: bool = True,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelContractError(f"model file {str(self.path)!r} does not exist")
        self.name = name or self.path.stem
        self._options = self._options_with(intra_op_threads=intra_op_threads)
        wanted = resolve_providers(providers)
        try:
            probe = ort.InferenceSession(str(self.path), self._options, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own Fail/InvalidGraph types for a broken file
            raise ModelContractError(f"model {self.name!r} cannot be loaded by ONNX Runtime: {e}") from e
        self.fingerprint = fingerprint(self.path)
        raw_meta = probe.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        flags = flags or FlagDeclaration(tuple(state_pairs or ()))
        if raw_meta is not None:
            declared = parse_metadata(raw_meta)
        elif flags.state:
            declared = declared_from_pairs(
                flags.state,
                [i.name for i in probe.get_inputs()],
                [o.name for o in probe.get_outputs()],
                mask=flags.mask,
                form=flags.form,
                constants=flags.constants,
            )
        else:
            raise ModelContractError(
                f"model {self.name!r} has no {METADATA_KEY!r} metadata; name its state pairs (--state IN:OUT)"
            )
        self.contract = build_contract(declared, probe, _initializers(self.path, set(declared.initials.values())))
        source: str | onnx.ModelProto = str(self.path)
        if self.contract.form == "step":
            source = with_step_carry(onnx.load_model(str(self.path)), self.contract)
            self.session = self._session(source, wanted, self._options)
        else:
            self.session = probe if wanted == ["CPUExecutionProvider"] else self._session(source, wanted, self._options)
        self.provider = self.session.get_providers()[0]
        self.device = "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"
        self._output_names = [o.name for o in self.session.get_outputs()]
        # Tiny calls (``run(tiny=True)``: the scheduler's inline ones, B x T of a few cells, made
        # only when nothing else is queued) on the CPU go to a second session: with ``idle_spin``
        # two threads that spin between calls, as a naive server's pool does (a B=1 step on a
        # sleeping pool waits for its threads to wake), else one thread (no pool to wake). The
        # main session never spins: under load its threads would take the loop's and Redis's
        # cores (docs/bench/README.md). It holds a second copy of the weights.
        self._tiny_session = self.session
        small = self.path.stat().st_size <= TINY_SESSION_MAX_BYTES
        if self.device == "cpu" and small and (idle_spin or intra_op_threads != 1):
            tiny = self._options_with(intra_op_threads=2 if idle_spin else 1, spin=idle_spin)
            self._tiny_session = self._session(source, ["CPUExecutionProvider"], tiny)
        log.info(
            "model %s (%s form, %s) runs on %s; fingerprint %s",
            self.name,
            self.contract.form,
            self.contract.kind,
            self.provider,
            self.fingerprint[:12],
        )
        # Outputs the graph leaves symbolic are measured by the warm-up, so it runs regardless.
        if warm_up or self.contract.unmeasured:
            self._warm_up()

    def describe(self, name: str, *, default: bool) -> dict[str, Any]:
        """What ``GET /v1/models`` says about this model, served as ``name``."""
        c = self.contract
        entry: dict[str, Any] = {
            "name": name,
            "fingerprint": self.fingerprint,
            "kind": c.kind,
            "form": c.form,
            "provider": self.provider,
            "default": default,
            "inputs": [t.describe() for t in c.inputs],
            "outputs": [t.describe() for t in c.outputs],
            "states": [s.describe() for s in c.states],
        }
        if c.constants:
            entry["constants"] = [k.describe() for k in c.constants]
        if c.kind == "token_lm":
            vocab = c.vocab or ()
            entry["vocab"] = "".join(vocab) if all(len(v) == 1 for v in vocab) else list(vocab)
            entry["unk_id"] = c.unk_id
        return entry

    @staticmethod
    def _options_with(*, intra_op_threads: int, spin: bool = False) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        # ORT's pool threads spin while waiting for work; on a box whose cores also run the event
        # loop and Redis that spinning takes their CPU (see docs/bench/README.md).
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        options.log_severity_level = 3
        return options

    @staticmethod
    def _session(
        model: str | onnx.ModelProto, providers: list[str], options: ort.SessionOptions
    ) -> ort.InferenceSession:
        source = model if isinstance(model, str) else model.SerializeToString()
        return ort.InferenceSession(source, options, providers=providers)

    def _warm_up(self) -> None:
        """Run B=1, T=1 and B=2, T=3; check every output's real shape against the contract and
        fill in the dims the graph left symbolic. Errors name the tensor."""
        for batch, steps in ((1, 1), (2, 3)):
            inputs = {t.name: np.zeros((batch, steps, *t.shape), t.dtype) for t in self.contract.inputs}
            # Constants of lengths 1 and 2 (when B=2): one row padded, as in a served batch.
            rows = [placeholder_constants(self.contract, n + 1) for n in range(batch)]
            try:
                states = self.contract.initial_states(batch)
                constants = pad_constants(self.contract, rows)
                # B=1, T=1 is the tiny session's shape (the same graph), B=2, T=3 the main one's.
                result = self.run(inputs, np.ones((batch, steps), bool), states, constants, tiny=batch == 1)
            except Exception as e:  # e.g. a graph whose time loop was frozen at export
                raise ModelContractError(
                    f"model {self.name!r} failed its warm-up run at B={batch}, T={steps}: {e}"
                ) from e
            where = f"model {self.name!r} at B={batch}, T={steps}:"
            for s in self.contract.states:
                real = result.states[s.input].shape
                if real != (batch, *s.shape):
                    raise ModelContractError(
                        f"{where} state output {s.output!r} has shape {_graph_layout(real, s.batch_axis)}; "
                        f"its input {s.input!r} has {_graph_layout((batch, *s.shape), s.batch_axis)}"
                    )
            measured = {}
            for t in self.contract.outputs:
                real = result.outputs[t.name].shape
                if real[:2] != (batch, steps):
                    raise ModelContractError(f"{where} output {t.name!r} has shape {list(real)}; expected [B, T, ...]")
                measured[t.name] = tuple(real[2:])
            try:
                self.contract = resolve_outputs(self.contract, measured)
            except ModelContractError as e:
                raise ModelContractError(f"{where} {e}") from None

    def run(
        self,
        inputs: dict[str, np.ndarray],
        mask: np.ndarray,
        states: dict[str, np.ndarray],
        constants: dict[str, np.ndarray] | None = None,
        *,
        tiny: bool = False,
    ) -> BatchResult:
        """Run one padded batch. Rows where ``mask`` is False keep their state and output zeros.
        ``constants``: the per-session constants and their masks as graph feeds (``pad_constants``),
        the same for every timestep. ``tiny``: a call of a few cells (on the CPU: one thread)."""
        session = self._tiny_session if tiny else self.session
        c = self.contract
        constants = constants or {}
        if missing := sorted({k.name for k in c.constants} - set(constants)):
            raise ValueError(f"the model's constants {missing} were not given")
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
                **constants,
                c.mask: np.ascontiguousarray(mask, dtype=c.mask_dtype),
            }
            if self.device == "cpu":  # a plain run: IO binding only pays where outputs stay on a device
                arrays = dict(zip(self._output_names, session.run(self._output_names, feeds), strict=True))
            else:
                arrays = {name: value.numpy() for name, value in self._run_bound(session, feeds, {}).items()}
            outputs = {t.name: arrays[t.name] for t in c.outputs}
            new_states = {s.input: arrays[s.output] for s in c.states}
        else:
            outputs, new_states = self._run_steps(
                session, feeds_inputs, np.asarray(mask, dtype=bool), feeds_states, constants
            )
        return BatchResult(outputs, {s.input: np.moveaxis(new_states[s.input], s.batch_axis, 0) for s in c.states})

    def _run_bound(
        self, session: ort.InferenceSession, feeds: dict[str, np.ndarray], device_feeds: dict[str, ort.OrtValue]
    ) -> dict[str, ort.OrtValue]:
        """One call with IO binding; outputs stay on the model's device until read."""
        binding = session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)
        for name, value in device_feeds.items():
            binding.bind_ortvalue_input(name, value)
        for name in self._output_names:
            binding.bind_output(name, self.device)
        session.run_with_iobinding(binding)
        return dict(zip(self._output_names, binding.get_outputs(), strict=True))

    def _run_steps(
        self,
        session: ort.InferenceSession,
        inputs: dict[str, np.ndarray],
        mask: np.ndarray,
        states: dict[str, np.ndarray],
        constants: dict[str, np.ndarray],
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        c = self.contract
        batch, steps = mask.shape
        outputs: dict[str, np.ndarray] = {}
        # Constants are copied to the device once and bound to every timestep from there.
        device_constants = {k: ort.OrtValue.ortvalue_from_numpy(v, self.device) for k, v in constants.items()}
        device_states: dict[str, ort.OrtValue] = {}
        host_states: dict[str, np.ndarray] = dict(states)
        for t in range(steps):
            feeds = {name: np.ascontiguousarray(x[:, t]) for name, x in inputs.items()}
            feeds[STEP_MASK] = np.ascontiguousarray(mask[:, t])
            feeds.update(host_states)
            values = self._run_bound(session, feeds, {**device_constants, **device_states})
            for o in c.outputs:
                value = values[o.name].numpy()
                if o.name not in outputs:  # allocated from the first step: the graph may leave dims symbolic
                    outputs[o.name] = np.zeros((batch, steps, *value.shape[1:]), o.dtype)
                outputs[o.name][:, t] = value
            device_states = {s.input: values[s.output] for s in c.states}
            host_states = {}
        return outputs, {s.input: device_states[s.input].numpy() for s in c.states}
