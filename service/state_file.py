"""The ``.npz`` state file of ``GET/PUT /v1/sessions/{id}/state``: one array per state tensor,
plus ``carryover_step``, ``carryover_fingerprint`` and ``carryover_model``."""

from __future__ import annotations

import io
import zipfile
from typing import Any

import numpy as np

from service.engine.model import RecurrentModel
from service.engine.tensors import states_from_bytes
from service.errors import InvalidInput, ModelMismatch
from service.store.store import SessionRecord

META_KEYS = ("carryover_step", "carryover_fingerprint", "carryover_model")


def write_state_file(model: RecurrentModel, record: SessionRecord) -> bytes:
    """The session's state tensors, step, fingerprint and model as an ``.npz``."""
    arrays: dict[str, Any] = {
        **states_from_bytes(model.contract, record.states),
        "carryover_step": np.int64(record.step),
        "carryover_fingerprint": np.str_(record.fingerprint),
        "carryover_model": np.str_(record.model),
    }
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def read_state_file(data: bytes, model: RecurrentModel) -> tuple[dict[str, np.ndarray], int]:
    """Validate an uploaded ``.npz``: names, shapes, dtypes, finite values, same model. Never
    unpickles (``allow_pickle=False``)."""
    c = model.contract
    try:
        archive = np.load(io.BytesIO(data), allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise InvalidInput("the state must be an .npz archive with one array per state tensor")
        arrays = {k: archive[k] for k in archive.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise InvalidInput(f"the state is not a readable .npz archive without pickles: {e}") from None
    names = {s.input for s in c.states}
    for key in arrays:
        if key not in names and key not in META_KEYS:
            raise InvalidInput(f"unknown tensor {key!r} in the state; the model's state tensors are {sorted(names)}")
    fp = arrays.get("carryover_fingerprint")
    if fp is not None and str(fp) != model.fingerprint:
        raise ModelMismatch(
            f"the state was written by a model with fingerprint {str(fp)[:12]}…, this session's "
            f"model is {model.fingerprint[:12]}…"
        )
    states = {}
    for s in c.states:
        if s.input not in arrays:
            raise InvalidInput(f"state tensor {s.input!r} is missing from the archive")
        a = arrays[s.input]
        if a.shape != s.shape:
            raise InvalidInput(f"state tensor {s.input!r} has shape {list(a.shape)}; the model expects {list(s.shape)}")
        if a.dtype != s.dtype:
            raise InvalidInput(f"state tensor {s.input!r} is {a.dtype.name}; the model expects {s.dtype.name}")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise InvalidInput(f"state tensor {s.input!r} contains NaN or Inf")
        states[s.input] = a
    step_value = arrays.get("carryover_step")
    step = 0
    if step_value is not None:
        if step_value.shape != () or step_value.dtype.kind not in "iu" or int(step_value) < 0:
            raise InvalidInput("carryover_step must be a non-negative integer scalar")
        step = int(step_value)
    return states, step
