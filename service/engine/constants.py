"""Per-session constants (docs/contract.md §1): checked at session creation, stored with the
session, and padded per batch.

A model may declare inputs that stay fixed for a session, e.g. the encoder outputs an attention
decoder attends over. A client gives one session's slice of each (batch axis removed, e.g.
``memory`` as ``[L, D]``) when it creates the session; ``validate_constants`` turns the JSON into
arrays or raises ``InvalidInput`` / ``PayloadTooLarge`` naming the constant, before anything is
written. In a batch, ``pad_constants`` pads every row's constant along its length axis to the
longest (zeros) and builds the declared ``[B, L]`` mask (True at a row's real positions), so a
model that attends only where the mask is set sees each session's own memory, unpadded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from service.engine.contract import LENGTH, ConstantTensor, ModelContract
from service.engine.validation import integral_floats, rectangular
from service.errors import InvalidInput, PayloadTooLarge
from service.store.record import SessionRecord

_LE: Literal["<"] = "<"


def _shape(c: ConstantTensor) -> str:
    return "[" + ", ".join("L" if d == LENGTH else str(d) for d in c.shape) + "]"


def _names(contract: ModelContract) -> list[str]:
    return [c.name for c in contract.constants]


def validate_constants(contract: ModelContract, raw: object, max_bytes: int) -> dict[str, np.ndarray]:
    """One session's constants from a create request (``None``: none given), each as its
    session-slice array of the constant's dtype. Every constant the model declares is required;
    their bytes together are at most ``max_bytes``."""
    names = _names(contract)
    if raw is None or raw == {}:
        if names:
            raise InvalidInput(f"missing 'constants': this model needs {names} when a session is created")
        return {}
    if not isinstance(raw, Mapping):
        raise InvalidInput("'constants' must be an object mapping each constant's name to an array")
    if not names:
        raise InvalidInput(f"'constants' given, but this model takes none (got {sorted(raw)})")
    if unknown := sorted(set(raw) - set(names)):
        raise InvalidInput(f"unknown constant {unknown[0]!r}; the model takes {names}")
    out = {}
    for c in contract.constants:
        if c.name not in raw:
            raise InvalidInput(f"missing constant {c.name!r}; the model takes {names}")
        out[c.name] = _one(c, raw[c.name])
    total = sum(v.nbytes for v in out.values())
    if total > max_bytes:
        big = max(out, key=lambda k: out[k].nbytes)
        raise PayloadTooLarge(
            f"constants are {total} bytes ({big!r}: {out[big].nbytes}); the limit is max_constant_bytes={max_bytes}"
        )
    _same_lengths(contract, out)
    return out


def _one(c: ConstantTensor, value: Any) -> np.ndarray:
    array = rectangular(value, f"constant {c.name!r}", _shape(c))
    fits = array.ndim == len(c.shape) and all(d in (LENGTH, r) for d, r in zip(c.shape, array.shape, strict=False))
    if not fits:
        raise InvalidInput(f"constant {c.name!r} has shape {list(array.shape)}; the model expects {_shape(c)}")
    axis = c.session_length_axis
    if axis is not None and array.shape[axis] == 0:
        raise InvalidInput(f"constant {c.name!r} is empty: its length (L, axis {axis}) must be at least 1")
    if c.dtype.kind in "iub":
        if integral_floats(array):
            array = array.astype(np.int64)
        if array.dtype.kind not in "iub":
            raise InvalidInput(f"constant {c.name!r} must hold integers ({c.dtype.name})")
        return array.astype(c.dtype)
    if array.dtype.kind not in "fiu":
        raise InvalidInput(f"constant {c.name!r} must hold numbers ({c.dtype.name})")
    with np.errstate(over="ignore", invalid="ignore"):
        cast = array.astype(c.dtype)
    if not np.isfinite(cast).all():
        raise InvalidInput(f"constant {c.name!r} contains NaN or Inf (or a value too large for {c.dtype.name})")
    return cast


def _same_lengths(contract: ModelContract, arrays: Mapping[str, np.ndarray]) -> None:
    """Constants that share one mask must have the same length (the mask is one per session)."""
    lengths: dict[str, tuple[str, int]] = {}
    for c in contract.constants:
        if c.mask is None or c.session_length_axis is None:
            continue
        n = arrays[c.name].shape[c.session_length_axis]
        first = lengths.setdefault(c.mask, (c.name, n))
        if first[1] != n:
            raise InvalidInput(
                f"constants {first[0]!r} and {c.name!r} share the mask {c.mask!r} but have lengths {first[1]} and {n}"
            )


# -- bytes in the session record ---------------------------------------------------------------
def constants_to_bytes(
    contract: ModelContract, arrays: Mapping[str, np.ndarray]
) -> tuple[tuple[bytes, ...], tuple[tuple[int, ...], ...]]:
    """Raw little-endian bytes and shapes, in declared order (the record stores both)."""
    blobs, shapes = [], []
    for c in contract.constants:
        a = np.ascontiguousarray(arrays[c.name], dtype=c.dtype.newbyteorder(_LE))
        blobs.append(a.tobytes())
        shapes.append(tuple(int(d) for d in a.shape))
    return tuple(blobs), tuple(shapes)


def constants_from_bytes(
    contract: ModelContract, blobs: Sequence[bytes], shapes: Sequence[Sequence[int]]
) -> dict[str, np.ndarray]:
    """A stored session's constants; ``ValueError`` when they do not fit the model (corrupt)."""
    if len(blobs) != len(contract.constants) or len(shapes) != len(blobs):
        raise ValueError(f"record has {len(blobs)} constants, the model has {len(contract.constants)}")
    out = {}
    for c, blob, shape in zip(contract.constants, blobs, shapes, strict=True):
        shape = tuple(int(d) for d in shape)
        fits = len(shape) == len(c.shape) and all(d in (LENGTH, r) for d, r in zip(c.shape, shape, strict=True))
        if not fits or len(blob) != int(np.prod(shape, dtype=np.int64)) * c.dtype.itemsize:
            raise ValueError(
                f"constant {c.name!r} is {len(blob)} bytes of shape {list(shape)}; the model expects {_shape(c)}"
            )
        out[c.name] = np.frombuffer(blob, dtype=c.dtype.newbyteorder(_LE)).astype(c.dtype).reshape(shape)
    return out


# -- batching ----------------------------------------------------------------------------------
def pad_constants(contract: ModelContract, rows: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The graph feeds of one batch: each constant stacked along its batch axis, padded with zeros
    along its length axis to the batch's longest, and each declared mask ``[B, L]``."""
    feeds: dict[str, np.ndarray] = {}
    for c in contract.constants:
        values = [row[c.name] for row in rows]
        axis = c.session_length_axis
        if axis is None:
            stacked = np.stack(values)
        else:
            longest = max(v.shape[axis] for v in values)
            shape = list(values[0].shape)
            shape[axis] = longest
            stacked = np.zeros((len(values), *shape), c.dtype)
            mask = np.zeros((len(values), longest), c.mask_dtype)
            for i, v in enumerate(values):
                np.moveaxis(stacked[i], axis, 0)[: v.shape[axis]] = np.moveaxis(v, axis, 0)
                mask[i, : v.shape[axis]] = 1
            assert c.mask is not None
            feeds[c.mask] = mask
        feeds[c.name] = np.ascontiguousarray(np.moveaxis(stacked, 0, c.batch_axis))
    return feeds


def placeholder_constants(contract: ModelContract, length: int = 1) -> dict[str, np.ndarray]:
    """Zeros of each constant with ``length`` positions: what the warm-up runs with."""
    return {c.name: np.zeros([length if d == LENGTH else d for d in c.shape], c.dtype) for c in contract.constants}


def constant_shapes(contract: ModelContract | None, record: SessionRecord) -> dict[str, list[int]]:
    """A session's constant shapes by name (what ``GET /v1/sessions/{id}`` reports); ``contract``
    None (the record's model is not served here): none."""
    names = [c.name for c in contract.constants] if contract is not None else []
    return {name: list(shape) for name, shape in zip(names, record.constant_shapes, strict=False)}
