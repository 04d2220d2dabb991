"""What a model declares: the ``carryover`` metadata JSON, or the operator's flags for a model
without it (docs/contract.md §1). Parsing and type checks only, errors naming the field; whether
the declaration fits the graph is ``contract.build_contract``'s job.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from service.errors import ModelContractError

METADATA_KEY = "carryover"
Form = Literal["sequence", "step"]
Kind = Literal["features", "token_lm"]


@dataclass(frozen=True)
class DeclaredConstant:
    """A per-session constant input: given at session creation, fed unchanged on every step.
    ``length_axis`` (a graph axis) varies per session and is padded per batch, with ``mask``
    marking the real positions; both are None for a constant of fixed shape."""

    input: str
    batch_axis: int = 0
    length_axis: int | None = None
    mask: str | None = None


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
    initials: dict[str, str] = field(default_factory=dict)  # state input -> initializer name
    constants: tuple[DeclaredConstant, ...] = ()


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


def parse_constant(text: str) -> DeclaredConstant:
    """``INPUT:BATCH_AXIS:LENGTH_AXIS:MASK`` (e.g. ``memory:0:1:memory_mask``), or
    ``INPUT:BATCH_AXIS`` for a constant of fixed shape (no length axis, no mask)."""
    parts = text.split(":")
    if len(parts) not in (2, 4) or not all(parts):
        raise ModelContractError(f"constant {text!r} must be INPUT:BATCH_AXIS:LENGTH_AXIS:MASK or INPUT:BATCH_AXIS")
    try:
        axes = [int(p) for p in parts[1:3]]
    except ValueError:
        raise ModelContractError(f"constant {text!r}: its axes must be integers") from None
    if len(parts) == 2:
        return DeclaredConstant(parts[0], axes[0])
    return DeclaredConstant(parts[0], axes[0], axes[1], parts[3])


def _constants(raw: object) -> tuple[DeclaredConstant, ...]:
    """The metadata's ``constants`` list: ``{input, batch_axis?, length_axis?, mask?}`` each."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ModelContractError("metadata 'constants' must be a list of {input, batch_axis, length_axis, mask}")
    out = []
    for i, c in enumerate(raw):
        if not isinstance(c, dict) or not isinstance(c.get("input"), str):
            raise ModelContractError(f"metadata constants[{i}] must have a string 'input'")
        where = f"metadata constants[{i}] ({c['input']})"
        if unknown := sorted(set(c) - {"input", "batch_axis", "length_axis", "mask"}):
            raise ModelContractError(f"{where}: unknown field(s) {unknown}")
        axes = [c.get("batch_axis", 0), c.get("length_axis")]
        if not all(a is None or (isinstance(a, int) and not isinstance(a, bool)) for a in axes) or axes[0] is None:
            raise ModelContractError(f"{where}: 'batch_axis' and 'length_axis' must be integers")
        mask = c.get("mask")
        if mask is not None and not isinstance(mask, str):
            raise ModelContractError(f"{where}: 'mask' must name a graph input")
        if (axes[1] is None) != (mask is None):
            raise ModelContractError(
                f"{where}: 'length_axis' and 'mask' go together (a fixed-size constant has neither)"
            )
        out.append(DeclaredConstant(c["input"], axes[0], axes[1], mask))
    return tuple(out)


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
    initials: dict[str, str] = {}
    for i, s in enumerate(states):
        if not isinstance(s, dict) or not isinstance(s.get("input"), str) or not isinstance(s.get("output"), str):
            raise ModelContractError(f"metadata state[{i}] must have string 'input' and 'output'")
        axis = s.get("batch_axis", 0)
        if not isinstance(axis, int) or isinstance(axis, bool):
            raise ModelContractError(f"metadata state[{i}] ({s['input']}): 'batch_axis' must be an integer")
        pairs.append((s["input"], s["output"], axis))
        if "initial" in s:
            if not isinstance(s["initial"], str):
                raise ModelContractError(f"metadata state[{i}] ({s['input']}): 'initial' must name a graph initializer")
            initials[s["input"]] = s["initial"]
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
    constants = _constants(meta.get("constants"))
    return DeclaredContract(
        form, kind, meta["inputs"], meta["outputs"], mask, pairs, vocab, unk_id, initials, constants
    )


@dataclass(frozen=True)
class FlagDeclaration:
    """What the operator names on the command line for a model without metadata
    (``--state IN:OUT[:AXIS]``, ``--mask NAME``, ``--form sequence|step``,
    ``--constant INPUT:BATCH_AXIS:LENGTH_AXIS:MASK``)."""

    state: tuple[str, ...] = ()
    mask: str | None = None
    form: Form | None = None
    constants: tuple[str, ...] = ()


def declared_from_pairs(
    pairs: Sequence[str],
    graph_inputs: list[str],
    graph_outputs: list[str],
    *,
    mask: str | None = None,
    form: Form | None = None,
    constants: Sequence[str] = (),
) -> DeclaredContract:
    """Operator-declared pairs (``--state h0:hn``) for a model without metadata. The mask is
    ``mask`` when given, else the input named ``mask`` unless the form is ``step``; the form is
    ``form`` when given, else sequence with a mask and step without; ``constants``
    (``--constant``) name the per-session constants and their masks; everything else is data."""
    states = [parse_state_pair(p) for p in pairs]
    declared_constants = tuple(parse_constant(c) for c in constants)
    if mask is None and form != "step" and "mask" in graph_inputs:
        mask = "mask"
    state_names = {s[0] for s in states} | {s[1] for s in states}
    constant_names = {c.input for c in declared_constants} | {c.mask for c in declared_constants if c.mask}
    return DeclaredContract(
        form=form or ("sequence" if mask else "step"),
        kind="features",
        inputs=[n for n in graph_inputs if n not in state_names | constant_names and n != mask],
        outputs=[n for n in graph_outputs if n not in state_names],
        mask=mask,
        states=states,
        constants=declared_constants,
    )
