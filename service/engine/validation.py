"""Turn a client's step inputs (JSON lists or arrays) into validated ``[T, ...]`` arrays.

Every rejection is an ``InvalidInput`` that names the input and what is wrong, raised before
anything is queued, so bad input never touches a session.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from service.engine.contract import DataTensor, ModelContract
from service.errors import InvalidInput


def integral(value: object) -> object:
    """JSON has one number type: an integral float (``3.0``, valid for a JSON Schema ``integer``)
    is that int; anything else, ``bool`` included, is returned as it is for the caller to judge."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def validate_inputs(contract: ModelContract, inputs: Mapping[str, Any], max_steps: int) -> dict[str, np.ndarray]:
    if not isinstance(inputs, Mapping) or not inputs:
        raise InvalidInput(f"'inputs' must be an object with the model's inputs {_names(contract)}")
    expected = {t.name for t in contract.inputs}
    for name in inputs:
        if name not in expected:
            raise InvalidInput(f"unknown input {name!r}; the model takes {_names(contract)}")
    out: dict[str, np.ndarray] = {}
    for t in contract.inputs:
        if t.name not in inputs:
            raise InvalidInput(f"missing input {t.name!r}; the model takes {_names(contract)}")
        out[t.name] = _one(contract, t, inputs[t.name], max_steps)
    lengths = {name: v.shape[0] for name, v in out.items()}
    if len(set(lengths.values())) > 1:
        raise InvalidInput(f"inputs disagree on the number of timesteps: {lengths}")
    return out


def _names(contract: ModelContract) -> list[str]:
    return [t.name for t in contract.inputs]


def rectangular(value: Any, what: str, shape: str) -> np.ndarray:
    """``value`` (JSON nested lists) as one array, or ``InvalidInput`` naming ``what`` and the
    ``shape`` it should have when the lists are ragged or mixed."""
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):  # ragged nested lists
        array = np.empty(0, dtype=object)
    if array.dtype == object:
        raise InvalidInput(f"{what} must be a rectangular array of shape {shape}")
    return array


def integral_floats(array: np.ndarray) -> bool:
    """Floats that are all whole numbers: JSON's 3.0 is the integer 3."""
    return array.dtype.kind == "f" and bool(np.all(np.isfinite(array) & (array == np.floor(array))))


def _one(contract: ModelContract, t: DataTensor, value: Any, max_steps: int) -> np.ndarray:
    want = ("T", *t.shape)
    array = rectangular(value, f"input {t.name!r}", _shape(want))
    if array.ndim >= 1 and array.shape[0] == 0:
        raise InvalidInput(f"input {t.name!r} is empty: it needs at least one timestep (T >= 1)")
    if array.ndim != len(want) or tuple(array.shape[1:]) != t.shape:
        got = _shape(array.shape)
        if array.ndim == len(t.shape) and tuple(array.shape) == t.shape:
            raise InvalidInput(
                f"input {t.name!r} has shape {got}; it needs a leading T axis: {_shape(want)} "
                f"(a single timestep is [[...]])"
            )
        raise InvalidInput(f"input {t.name!r} has shape {got}; the model expects {_shape(want)}")
    steps = array.shape[0]
    if steps > max_steps:
        raise InvalidInput(f"input {t.name!r} has {steps} timesteps; the limit per request is {max_steps}")
    if t.dtype.kind in "iu":
        return _tokens(contract, t, array)
    if array.dtype.kind not in "fiu":
        raise InvalidInput(f"input {t.name!r} must hold numbers ({t.dtype.name}), not {_kind(array)}")
    with np.errstate(over="ignore", invalid="ignore"):
        cast = array.astype(t.dtype)
    bad = ~np.isfinite(cast)
    if bad.any():
        step = int(np.argwhere(bad)[0][0])
        raise InvalidInput(
            f"input {t.name!r} contains NaN or Inf (or a value too large for {t.dtype.name}) at timestep {step}"
        )
    return cast


def _tokens(contract: ModelContract, t: DataTensor, array: np.ndarray) -> np.ndarray:
    if array.dtype.kind not in "iu" and not integral_floats(array):  # JSON's 3.0 is the id 3
        raise InvalidInput(f"input {t.name!r} must hold integer token ids, not {_kind(array)}")
    high = len(contract.vocab) if contract.vocab is not None else np.iinfo(t.dtype).max
    if array.min() >= 0 and array.max() < high:  # two reductions; the error's details only when needed
        return array.astype(t.dtype)
    out_of_range = (array < 0) | (array >= high)
    if out_of_range.any():
        step = int(np.argwhere(out_of_range)[0][0])
        raise InvalidInput(
            f"input {t.name!r}: token id {int(array.flat[step])} at timestep {step} is out of range [0, {high})"
        )
    return array.astype(t.dtype)


def _shape(shape: tuple[Any, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _kind(array: np.ndarray) -> str:
    return {"b": "booleans", "U": "strings", "S": "bytes", "f": "floats", "O": "mixed values"}.get(
        array.dtype.kind, array.dtype.name
    )
