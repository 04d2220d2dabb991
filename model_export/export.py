"""Export a ``StepCell`` to ONNX in both forms of the carryover contract.

Approach (why it cannot freeze T): only ONE timestep is ever traced. ``torch.onnx.export``
turns the cell into a step graph with a dynamic batch axis and no time axis at all. The
sequence form is then built in ONNX directly: the step graph becomes the body of an ONNX
``Scan`` over axis 1 of every data input and of the mask, and the body ends in the carry,
``state = Where(mask_t, new, old)`` and ``y_t = Where(mask_t, y, 0)``. ``Scan`` runs as many
iterations as the input has timesteps, whatever they are, and the ``Where`` carry holds for any
mask pattern (right or left padding, holes) and for every layer, because it acts on whole state
tensors after the cell. (ONNX's native GRU/LSTM ops were rejected: ``sequence_lens`` handles
right padding only and zeroes the state of length-0 rows.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.inliner
import torch
from onnx import TensorProto, helper

from model_export.cells import CellSpec, StepCell
from service.engine.carry import BATCH_DIM, Carried, add_carry
from service.engine.metadata import METADATA_KEY, Form

TIME_DIM = "T"
EXAMPLE_LENGTH = 5  # a constant's length in the traced example (any length works after export)


def contract_metadata(spec: CellSpec, form: Form) -> dict[str, object]:
    """The ``carryover`` metadata JSON of docs/contract.md for ``spec`` in ``form``."""
    meta: dict[str, object] = {
        "version": 1,
        "form": form,
        "kind": spec.kind,
        "inputs": [d.name for d in spec.inputs],
        "outputs": [d.name for d in spec.outputs],
        "state": [{"input": s.input, "output": s.output, "batch_axis": s.batch_axis} for s in spec.states],
    }
    if form == "sequence":
        meta["mask"] = "mask"
    if spec.constants:
        meta["constants"] = [
            {"input": c.name, "batch_axis": c.batch_axis}
            | ({"length_axis": c.length_axis, "mask": c.mask} if c.mask else {})
            for c in spec.constants
        ]
    if spec.kind == "token_lm":
        meta["vocab"] = spec.vocab
        meta["unk_id"] = spec.unk_id
    meta.update(spec.extra)
    return meta


def _example_args(cell: StepCell, spec: CellSpec, batch: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    args: list[torch.Tensor] = []
    for d in spec.inputs:
        if d.dtype.is_floating_point:
            args.append(torch.randn((batch, *d.shape), generator=gen, dtype=d.dtype))
        else:
            args.append(torch.zeros((batch, *d.shape), dtype=d.dtype))
    args.extend(s + 0.1 for s in cell.initial_state(batch))
    for c in spec.constants:
        shape = [batch if d == "B" else EXAMPLE_LENGTH if d == "L" else int(d) for d in c.shape]
        args.append(torch.randn(shape, generator=gen, dtype=c.dtype))
        if c.mask is not None:
            args.append(torch.ones((batch, EXAMPLE_LENGTH), dtype=torch.bool))
    return tuple(args)


def _constant_names(spec: CellSpec) -> list[str]:
    """The graph inputs of the constants, each followed by its mask (the cell's argument order)."""
    return [n for c in spec.constants for n in (c.name, c.mask) if n is not None]


def trace_step_graph(cell: StepCell, *, example_batch: int = 3) -> onnx.ModelProto:
    """Export one timestep of ``cell`` with a dynamic batch axis; local functions inlined."""
    spec = cell.spec()
    if not isinstance(cell, torch.nn.Module):
        raise TypeError("the cell must be a torch.nn.Module")
    cell.eval()
    module = _Flat(cell)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    dynamic: list[dict[int, object]] = [{0: batch} for _ in spec.inputs]
    dynamic += [{s.batch_axis: batch} for s in spec.states]
    for c in spec.constants:  # each length dim its own: sessions' memories differ in length
        length = torch.export.Dim(f"length_{c.name}", min=1, max=1 << 20)
        axes: dict[int, object] = {c.batch_axis: batch}
        if c.length_axis is not None:
            axes[c.length_axis] = length
        dynamic.append(axes)
        if c.mask is not None:
            dynamic.append({0: batch, 1: length})
    with torch.no_grad():
        program = torch.onnx.export(
            module,
            _example_args(cell, spec, example_batch),
            dynamo=True,
            input_names=[d.name for d in spec.inputs] + [s.input for s in spec.states] + _constant_names(spec),
            output_names=[d.name for d in spec.outputs] + [s.output for s in spec.states],
            dynamic_shapes=(tuple(dynamic),),
            optimize=True,
            verbose=False,
        )
    assert program is not None
    model = onnx.inliner.inline_local_functions(program.model_proto)
    _name_batch_dims(model.graph, spec)
    return model


class _Flat(torch.nn.Module):
    """Gives any cell a ``forward(*args)`` signature so one dynamic-shape spec fits all."""

    def __init__(self, cell: torch.nn.Module) -> None:
        super().__init__()
        self.cell = cell

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.cell(*args))


def _name_batch_dims(graph: onnx.GraphProto, spec: CellSpec) -> None:
    """Give the batch dim of every graph input/output the same symbolic name ``B``."""
    axes = {d.name: 0 for d in (*spec.inputs, *spec.outputs)}
    axes.update({s.input: s.batch_axis for s in spec.states})
    axes.update({s.output: s.batch_axis for s in spec.states})
    axes.update({c.name: c.batch_axis for c in spec.constants})
    axes.update({c.mask: 0 for c in spec.constants if c.mask})
    lengths = {c.name: c.length_axis for c in spec.constants if c.length_axis is not None}
    lengths.update({c.mask: 1 for c in spec.constants if c.mask})
    names = {c.mask: f"L_{c.mask}" for c in spec.constants if c.mask} | {
        c.name: f"L_{c.mask}" for c in spec.constants if c.mask
    }
    for vi in (*graph.input, *graph.output):
        dims = vi.type.tensor_type.shape.dim
        if vi.name in axes and len(dims) > axes[vi.name]:
            dims[axes[vi.name]].Clear()
            dims[axes[vi.name]].dim_param = BATCH_DIM
        if vi.name in lengths:
            dims[lengths[vi.name]].Clear()
            dims[lengths[vi.name]].dim_param = names[vi.name]


def _finish(model: onnx.ModelProto, spec: CellSpec, form: Form, producer: str) -> onnx.ModelProto:
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key = METADATA_KEY
    entry.value = json.dumps(contract_metadata(spec, form))
    model.producer_name = producer
    onnx.checker.check_model(model)
    return model


def build_step_model(step: onnx.ModelProto, spec: CellSpec) -> onnx.ModelProto:
    model = onnx.ModelProto()
    model.CopyFrom(step)
    return _finish(model, spec, "step", "carryover.model_export")


def _prefixed(name: str, keep: set[str]) -> str:
    return name if (not name or name in keep) else f"cell/{name}"


def build_sequence_model(step: onnx.ModelProto, spec: CellSpec) -> onnx.ModelProto:
    """Wrap the step graph in a ``Scan`` over time with the masked carry (see module doc)."""
    g = step.graph
    # Per-session constants are graph inputs of the sequence form too, read by the body from the
    # outer scope: the same tensor at every timestep, never scanned, never carried.
    constants = _constant_names(spec)
    outer_names = {init.name for init in g.initializer} | set(constants)
    # Body: the cell's nodes with every value renamed into the body scope; weights stay
    # outer-scope initializers so they are loaded (and on CUDA uploaded) once.
    body_nodes: list[onnx.NodeProto] = []
    for node in g.node:
        n = onnx.NodeProto()
        n.CopyFrom(node)
        n.input[:] = [_prefixed(i, outer_names) for i in node.input]
        n.output[:] = [_prefixed(o, outer_names) for o in node.output]
        if n.name:
            n.name = f"cell/{n.name}"
        body_nodes.append(n)

    types = {vi.name: vi.type for vi in (*g.input, *g.output)}

    def body_value(name: str, src: str) -> onnx.ValueInfoProto:
        return _typed(name, types[src])

    body_inputs = [body_value(f"cell/{s.input}", s.input) for s in spec.states]
    body_inputs += [body_value(f"cell/{d.name}", d.name) for d in spec.inputs]
    body_outputs = [body_value(f"cell/{s.output}", s.output) for s in spec.states]
    body_outputs += [body_value(f"cell/{d.name}", d.name) for d in spec.outputs]
    body = helper.make_graph(body_nodes, "carryover_step", body_inputs, body_outputs)
    # The body ends in the runtime's own carry; it appends the mask as the last scan input.
    carried = [Carried(f"cell/{s.output}", len(s.shape), s.batch_axis, keep=f"cell/{s.input}") for s in spec.states]
    carried += [Carried(f"cell/{d.name}", 1 + len(d.shape), 0, dtype=_numpy_dtype(d.dtype)) for d in spec.outputs]
    add_carry(body, "mask_t", carried)

    def with_time(name: str) -> onnx.ValueInfoProto:
        vi = onnx.ValueInfoProto()
        vi.name = name
        vi.type.CopyFrom(types[name])
        dims = vi.type.tensor_type.shape.dim
        t = dims.add()
        t.dim_param = TIME_DIM
        # move the new dim to axis 1: [B, ...] -> [B, T, ...]
        values = [(d.dim_param, d.dim_value) for d in dims]
        values = [values[0], values[-1], *values[1:-1]]
        for dim, (param, value) in zip(dims, values, strict=True):
            dim.Clear()
            if param:
                dim.dim_param = param
            else:
                dim.dim_value = value
        return vi

    n_scan = len(spec.inputs) + 1
    scan = helper.make_node(
        "Scan",
        [s.input for s in spec.states] + [d.name for d in spec.inputs] + ["mask"],
        [s.output for s in spec.states] + [d.name for d in spec.outputs],
        name="carryover/time_loop",
        body=body,
        num_scan_inputs=n_scan,
        scan_input_axes=[1] * n_scan,
        scan_output_axes=[1] * len(spec.outputs),
    )
    graph = helper.make_graph(
        [scan],
        "carryover_sequence",
        [with_time(d.name) for d in spec.inputs]
        + [helper.make_tensor_value_info("mask", TensorProto.BOOL, [BATCH_DIM, TIME_DIM])]
        + [types_vi(s.input, types) for s in spec.states]
        + [types_vi(name, types) for name in constants],
        [with_time(d.name) for d in spec.outputs] + [types_vi(s.output, types) for s in spec.states],
        initializer=list(g.initializer),
    )
    model = helper.make_model(graph, opset_imports=list(step.opset_import), ir_version=step.ir_version)
    return _finish(model, spec, "sequence", "carryover.model_export")


def _numpy_dtype(dtype: torch.dtype) -> np.dtype[Any]:
    result: np.dtype[Any] = torch.empty((), dtype=dtype).numpy().dtype
    return result


def types_vi(name: str, types: dict[str, onnx.TypeProto]) -> onnx.ValueInfoProto:
    return _typed(name, types[name])


def _typed(name: str, type_: onnx.TypeProto) -> onnx.ValueInfoProto:
    vi = onnx.ValueInfoProto()
    vi.name = name
    vi.type.CopyFrom(type_)
    return vi


def export_cell(cell: StepCell, path: str | Path, form: Form = "sequence") -> Path:
    """Export ``cell`` to ``path`` as a carryover model of the given form."""
    spec = cell.spec()
    step = trace_step_graph(cell)
    model = build_sequence_model(step, spec) if form == "sequence" else build_step_model(step, spec)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(out))
    return out


def export_both(cell: StepCell, sequence_path: str | Path, step_path: str | Path) -> tuple[Path, Path]:
    """Both forms from one trace of the same module (same weights, same step graph)."""
    spec = cell.spec()
    step = trace_step_graph(cell)
    paths = (Path(sequence_path), Path(step_path))
    for model, p in zip((build_sequence_model(step, spec), build_step_model(step, spec)), paths, strict=True):
        p.parent.mkdir(parents=True, exist_ok=True)
        onnx.save_model(model, str(p))
    return paths
