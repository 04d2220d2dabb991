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
UNPACKED_SLACK_BYTES = 64 * 1024  # .npy headers and the metadata arrays


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
    names = {s.input for s in c.states}
    # Unpacked size bound (a small deflated upload must not expand into gigabytes): the states + headers.
    limit = sum(s.nbytes for s in c.states) + UNPACKED_SLACK_BYTES
    arrays = _arrays(data, sorted(names), limit)
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


def _arrays(data: bytes, names: list[str], limit: int) -> dict[str, np.ndarray]:
    """The arrays of an uploaded ``.npz``; anything else is ``InvalidInput`` saying what the upload
    must be (numpy's own messages talk about pickles, which are never loaded here)."""
    must = (
        f"the upload must be an .npz archive as GET .../state returns it (a zip of .npy arrays: {names}, "
        "optionally carryover_step and carryover_fingerprint)"
    )
    if not zipfile.is_zipfile(io.BytesIO(data)):
        raise InvalidInput(f"{must}; this body is not a zip archive")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            unpacked = sum(info.file_size for info in z.infolist())
        if unpacked > limit:
            raise InvalidInput(f"{must}; it unpacks to {unpacked} bytes, more than this model's state ({limit})")
        archive = np.load(io.BytesIO(data), allow_pickle=False)
        arrays = {k: archive[k] for k in archive.files}
    except ValueError as e:
        why = "an array holds Python objects, which are never unpickled" if "pickle" in str(e) else str(e)
        raise InvalidInput(f"{must}; {why}") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError, RuntimeError, NotImplementedError) as e:
        raise InvalidInput(f"{must}; a member is not a readable .npy array ({type(e).__name__})") from None
    odd = sorted(k for k, v in arrays.items() if not isinstance(v, np.ndarray))  # a member not named .npy
    if odd:
        raise InvalidInput(f"{must}; member(s) {odd} are not .npy arrays")
    return arrays
