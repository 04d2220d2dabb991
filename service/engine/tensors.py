"""Byte layouts of tensors that go to Redis: session states, and the replay copy of outputs.

States are raw little-endian bytes in the contract's declared order (docs/contract.md §2): shape and dtype
come from the model, so nothing but the data is stored. The replay copy of a request's outputs
is a small self-describing frame (a JSON header then raw bytes); nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from typing import Literal

import numpy as np
import orjson

from service.engine.constants import constants_from_bytes
from service.engine.contract import ModelContract
from service.store.record import SessionRecord

_LE: Literal["<"] = "<"


def states_to_bytes(contract: ModelContract, states: Mapping[str, np.ndarray]) -> tuple[bytes, ...]:
    """One session's states (each of the state's slice shape) as raw little-endian bytes."""
    return tuple(
        np.ascontiguousarray(states[s.input], dtype=s.dtype.newbyteorder(_LE)).tobytes() for s in contract.states
    )


def initial_state_bytes(contract: ModelContract) -> tuple[bytes, ...]:
    """Where every session starts and where reset returns it: the learned initial state, else zeros."""
    return states_to_bytes(contract, {k: v[0] for k, v in contract.initial_states(1).items()})


def states_from_bytes(contract: ModelContract, blobs: tuple[bytes, ...]) -> dict[str, np.ndarray]:
    if len(blobs) != len(contract.states):
        raise ValueError(f"record has {len(blobs)} state tensors, the model has {len(contract.states)}")
    out = {}
    for s, blob in zip(contract.states, blobs, strict=True):
        if len(blob) != s.nbytes:
            raise ValueError(f"state {s.input!r} is {len(blob)} bytes, expected {s.nbytes}")
        # Read-only views of the record's bytes where the byte order is native (no copy): rows are
        # only ever stacked into a new batch array, never written in place.
        out[s.input] = np.frombuffer(blob, dtype=s.dtype.newbyteorder(_LE)).astype(s.dtype, copy=False).reshape(s.shape)
    return out


def session_tensors(
    contract: ModelContract, record: SessionRecord
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A loaded record's states and constants; ``ValueError`` when they do not fit the model."""
    constants = constants_from_bytes(contract, record.constants, record.constant_shapes)
    return states_from_bytes(contract, record.states), constants


def pack_arrays(arrays: Mapping[str, np.ndarray]) -> bytes:
    """``[u32 header length][JSON header][raw little-endian bytes ...]``."""
    header = [{"name": k, "dtype": v.dtype.newbyteorder(_LE).str, "shape": list(v.shape)} for k, v in arrays.items()]
    head = orjson.dumps(header)
    body = b"".join(np.ascontiguousarray(v, dtype=v.dtype.newbyteorder(_LE)).tobytes() for v in arrays.values())
    return struct.pack("<I", len(head)) + head + body


def unpack_arrays(blob: bytes) -> dict[str, np.ndarray]:
    (n,) = struct.unpack_from("<I", blob)
    header = orjson.loads(blob[4 : 4 + n])
    offset = 4 + n
    out = {}
    for h in header:
        dtype = np.dtype(h["dtype"])
        if dtype.hasobject:
            raise ValueError("object arrays are never stored")
        count = int(np.prod(h["shape"], dtype=np.int64))
        out[h["name"]] = np.frombuffer(blob, dtype, count, offset).reshape(h["shape"]).astype(dtype.newbyteorder("="))
        offset += count * dtype.itemsize
    return out


def request_digest(inputs: Mapping[str, np.ndarray]) -> str:
    """Identity of a step request's inputs (names, dtypes, shapes and bytes), for replays."""
    h = hashlib.sha256()
    for name in sorted(inputs):
        v = np.ascontiguousarray(inputs[name])
        h.update(orjson.dumps([name, v.dtype.str, list(v.shape)]))
        h.update(v.tobytes())
    return h.hexdigest()
