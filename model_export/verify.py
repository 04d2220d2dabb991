"""``carryover verify``: check the invariant on an exported model, through the serving runtime.

Random sequences are split into random chunks and run in random padded batches next to each
other (right padding, left padding, holes, all-padding rows, T values unlike the export
example, B = 1 and B > 1), carrying each sequence's state from batch to batch exactly as the
service does. Every sequence's outputs and final state must equal its unpadded B = 1 run, and
(with ``--torch-module``) PyTorch's own step-by-step run, or (with ``--keras``) Keras's own
``predict`` and stateful calls (``model_export.keras_verify``). Padded outputs must be zero and an
all-padding row must leave its state byte-identical. Torch and Keras are imported only for those
options.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.engine.constants import pad_constants
from service.engine.contract import LENGTH, ModelContract
from service.engine.model import RecurrentModel

Layout = str  # "right" | "left" | "holes" | "empty"


@dataclass
class VerifyReport:
    model: str
    tolerance: float
    sequences: int = 0
    batches: int = 0
    batch_sizes: set[int] = field(default_factory=set)
    batch_steps: set[int] = field(default_factory=set)
    layouts: set[Layout] = field(default_factory=set)
    worst_output_error: float = 0.0
    worst_state_error: float = 0.0
    worst_torch_error: float | None = None
    worst_keras_error: float | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def render(self) -> str:
        lines = [
            f"verify {self.model}: {'OK' if self.ok else 'FAILED'}",
            f"  {self.sequences} sequences in {self.batches} padded batches "
            f"(B {min(self.batch_sizes, default=0)}..{max(self.batch_sizes, default=0)}, "
            f"T {min(self.batch_steps, default=0)}..{max(self.batch_steps, default=0)}; "
            f"layouts: {', '.join(sorted(self.layouts))})",
            f"  worst |error| vs unpadded B=1 run: outputs {self.worst_output_error:.3g}, "
            f"states {self.worst_state_error:.3g} (tolerance {self.tolerance:g})",
        ]
        if self.worst_torch_error is not None:
            lines.append(f"  worst |error| vs PyTorch: {self.worst_torch_error:.3g}")
        if self.worst_keras_error is not None:
            lines.append(f"  worst |error| vs Keras (predict, stateful chunks): {self.worst_keras_error:.3g}")
        lines += [f"  FAIL: {f}" for f in self.failures[:10]]
        return "\n".join(lines)


def random_inputs(contract: ModelContract, steps: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Inputs for one sequence, ``[T, ...]``: token ids within the vocab, or standard normals."""
    out = {}
    for t in contract.inputs:
        if t.dtype.kind in "iu":
            high = len(contract.vocab) if contract.vocab else 16
            out[t.name] = rng.integers(0, high, size=(steps, *t.shape)).astype(t.dtype)
        else:
            out[t.name] = rng.standard_normal((steps, *t.shape)).astype(t.dtype)
    return out


def random_constants(contract: ModelContract, rng: np.random.Generator, max_length: int = 9) -> dict[str, np.ndarray]:
    """One session's per-session constants (standard normals), each of a random length."""
    out = {}
    for c in contract.constants:
        length = int(rng.integers(1, max_length + 1))
        shape = [length if d == LENGTH else d for d in c.shape]
        out[c.name] = rng.standard_normal(shape).astype(c.dtype)
    return out


def unpadded_run(
    model: RecurrentModel, inputs: dict[str, np.ndarray], constants: dict[str, np.ndarray] | None = None
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The reference: one sequence alone, B = 1, no padding, from the initial state, with its own
    (unpadded) constants when the model has any."""
    steps = next(iter(inputs.values())).shape[0]
    feeds = pad_constants(model.contract, [constants or {}]) if model.contract.constants else None
    result = model.run(
        {k: v[None] for k, v in inputs.items()}, np.ones((1, steps), bool), model.contract.initial_states(1), feeds
    )
    return ({k: v[0] for k, v in result.outputs.items()}, {k: v[0] for k, v in result.states.items()})


@dataclass(frozen=True)
class Row:
    """One row of a padded batch: ``positions`` are the real steps of ``sequence``'s next chunk
    (in order); the other columns are padding. No positions = an all-padding row."""

    sequence: int
    positions: tuple[int, ...]

    def layout(self, width: int) -> Layout:
        n = len(self.positions)
        if n == 0:
            return "empty"
        if self.positions == tuple(range(n)):
            return "right"
        if self.positions == tuple(range(width - n, width)):
            return "left"
        return "holes"


@dataclass(frozen=True)
class Batch:
    width: int
    rows: tuple[Row, ...]


@dataclass
class ScheduleResult:
    outputs: list[dict[str, np.ndarray]]  # per sequence, [T, ...] over its real steps
    states: list[dict[str, np.ndarray]]  # per sequence, final state [1, ...]
    failures: list[str]


def random_schedule(lengths: list[int], rng: np.random.Generator, max_chunk: int) -> list[Batch]:
    """Random chunkings of every sequence, laid into random padded batches (B = 1 first)."""
    remaining = list(lengths)
    schedule: list[Batch] = []
    while any(remaining):
        pending = [i for i, n in enumerate(remaining) if n]
        if not schedule:
            chosen = [pending[0]]
        else:
            chosen = rng.choice(pending, size=int(rng.integers(1, len(pending) + 1)), replace=False).tolist()
        sizes = [min(remaining[i], int(rng.integers(1, max_chunk + 1))) for i in chosen]
        width = max(sizes) + int(rng.integers(0, 4))
        rows = []
        for i, size in zip(chosen, sizes, strict=True):
            layout = ("right", "left", "holes")[int(rng.integers(0, 3))]
            if layout == "right":
                positions = tuple(range(size))
            elif layout == "left":
                positions = tuple(range(width - size, width))
            else:
                positions = tuple(int(p) for p in np.sort(rng.choice(width, size=size, replace=False)))
            rows.append(Row(int(i), positions))
            remaining[i] -= size
        idle = [i for i in range(len(lengths)) if i not in chosen]
        if idle and rng.random() < 0.5:
            rows.append(Row(int(rng.choice(idle)), ()))
        schedule.append(Batch(width, tuple(rows)))
    return schedule


def run_schedule(
    model: RecurrentModel,
    data: list[dict[str, np.ndarray]],
    schedule: list[Batch],
    constants: list[dict[str, np.ndarray]] | None = None,
) -> ScheduleResult:
    """Run ``schedule`` the way the service does: each sequence's state carried between batches,
    its constants padded beside the other rows' along their length axes."""
    c = model.contract
    constants = constants or [{} for _ in data]
    lengths = [next(iter(d.values())).shape[0] for d in data]
    offset = [0] * len(data)
    states = [c.initial_states(1) for _ in data]
    got = [{t.name: np.zeros((n, *t.shape), t.dtype) for t in c.outputs} for n in lengths]
    failures: list[str] = []
    for batch in schedule:
        mask = np.zeros((len(batch.rows), batch.width), bool)
        inputs = {t.name: np.zeros((len(batch.rows), batch.width, *t.shape), t.dtype) for t in c.inputs}
        for r, row in enumerate(batch.rows):
            mask[r, list(row.positions)] = True
            for name, x in data[row.sequence].items():
                inputs[name][r, mask[r]] = x[offset[row.sequence] : offset[row.sequence] + len(row.positions)]
        before = [states[row.sequence] for row in batch.rows]
        stacked = {s.input: np.concatenate([b[s.input] for b in before]) for s in c.states}
        feeds = pad_constants(c, [constants[row.sequence] for row in batch.rows]) if c.constants else None
        result = model.run(inputs, mask, stacked, feeds)
        for r, row in enumerate(batch.rows):
            i, n = row.sequence, len(row.positions)
            for name, y in result.outputs.items():
                if np.any(y[r, ~mask[r]] != 0):
                    failures.append(f"output {name!r} is not zero at padded steps (sequence {i})")
                got[i][name][offset[i] : offset[i] + n] = y[r, mask[r]]
            states[i] = {k: v[r : r + 1] for k, v in result.states.items()}
            if n == 0 and any(states[i][k].tobytes() != before[r][k].tobytes() for k in states[i]):
                failures.append(f"an all-padding row changed the state of sequence {i}")
            offset[i] += n
    return ScheduleResult(got, states, failures)


def compare(
    result: ScheduleResult, refs: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]
) -> tuple[float, float]:
    """Worst output and state error of a schedule's results against the unpadded references."""
    out_err = state_err = 0.0
    for got, got_state, (ref_out, ref_state) in zip(result.outputs, result.states, refs, strict=True):
        out_err = max(out_err, *(_max_err(got[k], ref_out[k]) for k in ref_out))
        state_err = max(state_err, *(_max_err(got_state[k][0], ref_state[k]) for k in ref_state))
    return out_err, state_err


def _max_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)), initial=0.0))


def verify_model(
    model: RecurrentModel,
    *,
    sequences: int = 8,
    max_len: int = 40,
    max_chunk: int = 9,
    rounds: int = 3,
    seed: int = 0,
    tolerance: float = 1e-5,
    torch_module: Any | None = None,
    keras_model: Any | None = None,
) -> VerifyReport:
    """``rounds`` random schedules over the same random sequences; see the module doc."""
    rng = np.random.default_rng(seed)
    c = model.contract
    report = VerifyReport(model.name, tolerance, sequences=sequences)
    lengths = [1, *rng.integers(2, max_len + 1, size=sequences - 1).tolist()]
    make_inputs: Callable[[ModelContract, int, np.random.Generator], dict[str, np.ndarray]] = random_inputs
    if keras_model is not None:
        from model_export.keras_verify import keras_inputs

        make_inputs = keras_inputs(keras_model)
    data = [make_inputs(c, n, rng) for n in lengths]
    constants = [random_constants(c, rng) for _ in lengths]
    try:
        refs = [unpadded_run(model, d, k) for d, k in zip(data, constants, strict=True)]
        for _ in range(rounds):
            schedule = random_schedule(lengths, rng, max_chunk)
            result = run_schedule(model, data, schedule, constants)
            report.failures.extend(dict.fromkeys(result.failures))
            for batch in schedule:
                report.batches += 1
                report.batch_sizes.add(len(batch.rows))
                report.batch_steps.add(batch.width)
                report.layouts.update(row.layout(batch.width) for row in batch.rows)
            out_err, state_err = compare(result, refs)
            report.worst_output_error = max(report.worst_output_error, out_err)
            report.worst_state_error = max(report.worst_state_error, state_err)
    except Exception as e:  # a T-frozen graph often fails outright: report it, don't crash
        report.failures.append(f"running the model failed: {type(e).__name__}: {e}")
        return report
    if max(report.worst_output_error, report.worst_state_error) > tolerance:
        report.failures.append(
            f"chunked, padded runs differ from the unpadded B=1 runs by "
            f"{max(report.worst_output_error, report.worst_state_error):.3g}"
        )
    if torch_module is not None:
        report.worst_torch_error = compare_with_torch(torch_module, c, data, refs, constants)
        if report.worst_torch_error > tolerance:
            report.failures.append(f"ONNX differs from PyTorch by {report.worst_torch_error:.3g}")
    if keras_model is not None:
        from model_export.keras_verify import compare_with_keras

        report.worst_keras_error = compare_with_keras(keras_model, c, data, refs, seed)
        if report.worst_keras_error > tolerance:
            report.failures.append(f"ONNX differs from Keras by {report.worst_keras_error:.3g}")
    return report


def compare_with_torch(
    module: Any,
    contract: ModelContract,
    data: list[dict[str, np.ndarray]],
    refs: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]],
    constants: list[dict[str, np.ndarray]] | None = None,
) -> float:
    """Worst difference between the ONNX reference and the module's own step-by-step run (a
    module with constants takes each, batch of 1, after the states, followed by its all-true mask)."""
    import torch

    module.eval()
    worst = 0.0
    with torch.no_grad():
        for i, (inputs, (ref_out, ref_state)) in enumerate(zip(data, refs, strict=True)):
            fixed = []
            for k in contract.constants:
                value = (constants or [])[i][k.name]
                fixed.append(torch.from_numpy(np.expand_dims(value, k.batch_axis)))
                if k.mask is not None and k.session_length_axis is not None:
                    fixed.append(torch.ones((1, value.shape[k.session_length_axis]), dtype=torch.bool))
            state = tuple(module.initial_state(1))
            steps = next(iter(inputs.values())).shape[0]
            for t in range(steps):
                args = [torch.from_numpy(inputs[i.name][t : t + 1]) for i in contract.inputs]
                result = module(*args, *state, *fixed)
                n_out = len(contract.outputs)
                for o, y in zip(contract.outputs, result[:n_out], strict=True):
                    worst = max(worst, _max_err(y.numpy()[0], ref_out[o.name][t]))
                state = tuple(result[n_out:])
            for s, value in zip(contract.states, state, strict=True):
                worst = max(worst, _max_err(np.moveaxis(value.numpy(), s.batch_axis, 0)[0], ref_state[s.input]))
    return worst


def load_torch_module(spec: str) -> Any:
    """``package.module:attribute`` where the attribute is a module or a zero-argument factory."""
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise ValueError(f"--torch-module {spec!r} must look like package.module:factory")
    obj = getattr(importlib.import_module(module_name), attr)
    import torch

    return obj if isinstance(obj, torch.nn.Module) else obj()
