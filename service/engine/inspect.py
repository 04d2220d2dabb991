"""``carryover inspect``: read a graph's signature and guess its contract (state pairs, mask, form).

For a model without ``carryover`` metadata this says what the loader would need: each state
input is paired with the output of the same type and compatible shape whose name matches best
(``h0``/``hn``, ``c_in``/``c_out``, ``state``/``state_out``); its batch axis is its one
symbolic dim. The mask is a ``[B, T]`` bool or float input (named ``*mask*`` if several), and
the form is sequence with a mask, step when every data input has only a batch dim. The report
gives the exact ``serve`` flags and the metadata JSON for ``python -m model_export.annotate``.
Pure over a :class:`GraphSignature` (no ONNX Runtime import), so it is tested without files.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from service.engine.contract import GraphSignature, TensorArg
from service.engine.metadata import METADATA_KEY, DeclaredConstant, FlagDeclaration, Form

_STEM_NOISE = re.compile(r"(^|_)(in|out|prev|next|new|old|init|initial|last|final|t)(?=_|$)|_?(\d+|n)$")


@dataclass
class Inspection:
    """What ``inspect_signature`` found; ``form`` is None where the signature cannot tell."""

    inputs: list[TensorArg]
    outputs: list[TensorArg]
    pairs: list[tuple[str, str, int]] = field(default_factory=list)
    mask: str | None = None
    form: Form | None = None
    notes: list[str] = field(default_factory=list)
    constants: list[DeclaredConstant] = field(default_factory=list)

    def _constant_names(self) -> set[str]:
        return {c.input for c in self.constants} | {c.mask for c in self.constants if c.mask}

    def metadata(self) -> dict[str, object]:
        """The ``carryover`` metadata this inspection amounts to (form ``step`` if unknown)."""
        states = {n for p in self.pairs for n in p[:2]} | self._constant_names()
        constants = [
            {"input": c.input, "batch_axis": c.batch_axis, "length_axis": c.length_axis, "mask": c.mask}
            for c in self.constants
        ]
        return {
            "version": 1,
            "form": self.form or "step",
            "kind": "features",
            "inputs": [t.name for t in self.inputs if t.name not in states and t.name != self.mask],
            "outputs": [t.name for t in self.outputs if t.name not in states],
            **({"mask": self.mask} if self.mask else {}),
            "state": [{"input": i, "output": o, "batch_axis": a} for i, o, a in self.pairs],
            **({"constants": constants} if constants else {}),
        }

    def declaration(self) -> FlagDeclaration:
        """The flags this inspection amounts to, as the loader takes them."""
        constants = tuple(f"{c.input}:{c.batch_axis}:{c.length_axis}:{c.mask}" for c in self.constants)
        return FlagDeclaration(tuple(f"{i}:{o}:{a}" for i, o, a in self.pairs), self.mask, self.form, constants)

    def flags(self, model: str | None = None) -> list[str]:
        """The ``--state``/``--mask``/``--form`` flags (``MODEL=``-prefixed when ``model`` is given)
        that make the loader read this contract; defaults are left out."""
        prefix = f"{model}=" if model else ""
        out = [f"--state {prefix}{i}:{o}:{a}" if a else f"--state {prefix}{i}:{o}" for i, o, a in self.pairs]
        names = {t.name for t in self.inputs}
        default_mask = "mask" if "mask" in names and self.form != "step" else None
        if self.mask != default_mask:
            out.append(f"--mask {prefix}{self.mask}")
        if self.form is not None and self.form != ("sequence" if self.mask else "step"):
            out.append(f"--form {prefix}{self.form}")
        out += [f"--constant {prefix}{c.input}:{c.batch_axis}:{c.length_axis}:{c.mask}" for c in self.constants]
        return out


def stem(name: str) -> str:
    """A tensor name without the decorations that tell a state's input from its output."""
    lowered = name.lower().replace(".", "_").replace("::", "_").replace("-", "_")
    previous = None
    while previous != lowered:
        previous, lowered = lowered, _STEM_NOISE.sub("", lowered).strip("_")
    return lowered or name.lower()


def _symbolic(arg: TensorArg) -> list[int]:
    return [axis for axis, d in enumerate(arg.shape) if not isinstance(d, int)]


def _compatible(i: TensorArg, o: TensorArg) -> bool:
    """Same type and rank, and the input's fixed dims fixed alike or symbolic in the output."""
    if i.type != o.type or len(i.shape) != len(o.shape) or not i.shape:
        return False
    return all(
        not (isinstance(a, int) and isinstance(b, int) and a != b) for a, b in zip(i.shape, o.shape, strict=True)
    )


def _score(i: TensorArg, o: TensorArg) -> float:
    if stem(i.name) == stem(o.name):
        return 2.0
    return difflib.SequenceMatcher(None, i.name.lower(), o.name.lower()).ratio()


def _masks(inputs: list[TensorArg]) -> list[TensorArg]:
    """Inputs that may be a mask: ``[B, T]`` (or a constant's ``[B, L]``) bool or float."""
    return [
        t
        for t in inputs
        if len(t.shape) == 2 and len(_symbolic(t)) == 2 and t.type in ("tensor(bool)", "tensor(float)")
    ]


def _find_constants(inputs: list[TensorArg]) -> list[DeclaredConstant]:
    """Per-session constants: an input named like the prefix of a ``[B, L]`` mask (``memory`` and
    ``memory_mask``) whose shape holds the mask's symbolic ``L`` on an axis of its own."""
    found = []
    for m in _masks(inputs):
        length = m.shape[1]
        for t in inputs:
            owner = t.name.lower()
            if t is m or not m.name.lower().startswith(owner) or length not in list(t.shape)[1:]:
                continue
            axes = _symbolic(t)
            if len(axes) == 2:
                length_axis = list(t.shape).index(length, 1)
                batch_axis = next(a for a in axes if a != length_axis)
                found.append(DeclaredConstant(t.name, batch_axis, length_axis, m.name))
                break
    return found


def _find_mask(inputs: list[TensorArg]) -> str | None:
    masks = _masks(inputs)
    named = [t for t in masks if "mask" in t.name.lower()]
    if named:
        return named[0].name
    bools = [t for t in masks if t.type == "tensor(bool)"]
    return bools[0].name if len(bools) == 1 else None


def inspect_signature(graph: GraphSignature) -> Inspection:
    """Guess the contract of a graph without metadata; see the module doc."""
    inputs, outputs = list(graph.get_inputs()), list(graph.get_outputs())
    constants = _find_constants(inputs)
    taken = {c.input for c in constants} | {c.mask for c in constants}
    found = Inspection(
        inputs, outputs, mask=_find_mask([t for t in inputs if t.name not in taken]), constants=constants
    )
    # A state input has exactly one symbolic dim (its batch); sequence-form data has two (B, T).
    candidates = [t for t in inputs if t.name != found.mask and len(_symbolic(t)) == 1]
    scored = sorted(
        ((_score(i, o), i, o) for i in candidates for o in outputs if _compatible(i, o)),
        key=lambda x: -x[0],
    )
    used: set[str] = set()
    for score, i, o in scored:
        if i.name in used or o.name in used or score < 0.5:
            continue
        used |= {i.name, o.name}
        found.pairs.append((i.name, o.name, _symbolic(i)[0]))
    data = [t for t in inputs if t.name not in used | taken and t.name != found.mask]
    if found.mask:
        found.form = "sequence"
    elif data and all(len(_symbolic(t)) == 1 and _symbolic(t)[0] == 0 for t in data):
        found.form = "step"
    elif any(len(_symbolic(t)) >= 2 for t in data):
        found.notes.append(
            "data inputs have two dynamic dims ([B, T, ...]) but no [B, T] mask input: the sequence form "
            "needs one (the carry at padded steps); export with a mask, or export a one-step cell"
        )
    else:
        found.notes.append("cannot tell the form from the shapes: pass --form sequence or --form step")
    if not found.pairs:
        found.notes.append("no state pair found: an input and an output of the same type and shape")
    return found


def _describe(t: TensorArg) -> str:
    return f"{t.name}  {t.type.removeprefix('tensor(').removesuffix(')')}  {list(t.shape)}"


def render(found: Inspection, path: Path, name: str, metadata: str | None) -> str:
    """The human report of ``carryover inspect``."""
    lines = [f"inspect {path}", "  inputs:"]
    lines += [f"    {_describe(t)}" for t in found.inputs]
    lines += ["  outputs:"] + [f"    {_describe(t)}" for t in found.outputs]
    if metadata is not None:
        lines += [f"  {METADATA_KEY!r} metadata (no flags needed):", f"    {metadata}"]
        return "\n".join(lines)
    shapes = {t.name: list(t.shape) for t in [*found.inputs, *found.outputs]}
    lines.append(f"  no {METADATA_KEY!r} metadata; found:")
    for i, o, a in found.pairs:
        lines.append(f"    state  {i} {shapes[i]} -> {o} {shapes[o]}  (batch axis {a})")
    lines.append(f"    mask   {found.mask or '(none)'}")
    lines.append(f"    form   {found.form or '(cannot tell)'}")
    for c in found.constants:
        axes = f"batch axis {c.batch_axis}, length axis {c.length_axis}, mask {c.mask}"
        lines.append(f"    constant  {c.input} {shapes[c.input]}  ({axes})")
    lines += [f"  note: {n}" for n in found.notes]
    if found.pairs:
        flags = " ".join(found.flags(name))
        lines += [
            "  serve it with:",
            f"    carryover serve --model {name}={path} {flags}",
            "  or write the metadata into the file (then no flags are needed):",
            f"    python -m model_export.annotate {path} {' '.join(found.flags())}",
            f"    ({METADATA_KEY}: {json.dumps(found.metadata())})",
        ]
    return "\n".join(lines)
