"""The byte formats that go to Redis: state blobs, the replay frame, and the request digest."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import orjson
import pytest

from service.engine.contract import DataTensor, ModelContract, StateTensor
from service.engine.tensors import (
    initial_state_bytes,
    pack_arrays,
    request_digest,
    states_from_bytes,
    states_to_bytes,
    unpack_arrays,
)

CONTRACT = ModelContract(
    "sequence",
    "features",
    (DataTensor("x", np.dtype(np.float32), (2,)),),
    (DataTensor("y", np.dtype(np.float32), (2,)),),
    (
        StateTensor("h0", "hn", np.dtype(np.float32), (2, 3), batch_axis=1),
        StateTensor("c0", "cn", np.dtype(np.float64), (4,)),
        StateTensor("n0", "nn", np.dtype(np.int64), ()),
    ),
    mask="mask",
)


def states(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "h0": rng.standard_normal((2, 3)).astype(np.float32),
        "c0": rng.standard_normal(4),
        "n0": np.array(-5, np.int64),
    }


def test_states_round_trip_exactly_as_raw_little_endian_bytes_in_declared_order() -> None:
    s = states()
    blobs = states_to_bytes(CONTRACT, s)
    assert [len(b) for b in blobs] == [24, 32, 8]  # data only: shape and dtype come from the model
    assert blobs[0] == s["h0"].astype("<f4").tobytes()
    assert blobs[2] == struct.pack("<q", -5)
    back = states_from_bytes(CONTRACT, blobs)
    assert list(back) == ["h0", "c0", "n0"]
    for k, v in s.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        np.testing.assert_array_equal(back[k], v)


def test_states_accept_non_contiguous_and_big_endian_arrays() -> None:
    s = states()
    wide = np.zeros((3, 2), np.float32)
    wide[:] = s["h0"].T
    s2 = {**s, "h0": wide.T, "c0": s["c0"].astype(">f8")}  # a transposed view; a big-endian copy
    assert states_to_bytes(CONTRACT, s2) == states_to_bytes(CONTRACT, s)


def test_corrupt_state_blobs_are_refused() -> None:
    blobs = states_to_bytes(CONTRACT, states())
    with pytest.raises(ValueError, match="record has 2 state tensors, the model has 3"):
        states_from_bytes(CONTRACT, blobs[:2])
    with pytest.raises(ValueError, match="'c0' is 31 bytes, expected 32"):
        states_from_bytes(CONTRACT, (blobs[0], blobs[1][:-1], blobs[2]))


def test_initial_state_bytes_are_zeros_of_every_states_size() -> None:
    blobs = initial_state_bytes(CONTRACT)
    assert [len(b) for b in blobs] == [s.nbytes for s in CONTRACT.states]
    assert all(not any(b) for b in blobs)
    assert all(not v.any() for v in states_from_bytes(CONTRACT, blobs).values())


def test_pack_unpack_round_trip_keeps_names_order_dtypes_and_shapes() -> None:
    arrays = {
        "y": np.arange(6, dtype=np.float32).reshape(3, 2),
        "logits": np.linspace(-1, 1, 5).astype(">f8"),  # big-endian in, native out
        "ids": np.array([[1, 2]], np.int64),
        "flags": np.array([True, False]),
        "half": np.array([0.5], np.float16),
        "empty": np.zeros((0, 4), np.float32),
        "scalar": np.array(7, np.int32),
    }
    blob = pack_arrays(arrays)
    (n,) = struct.unpack_from("<I", blob)
    header = orjson.loads(blob[4 : 4 + n])
    assert [h["name"] for h in header] == list(arrays)
    assert header[1]["dtype"] == "<f8"  # stored little-endian whatever came in
    back = unpack_arrays(blob)
    assert list(back) == list(arrays)
    for k, v in arrays.items():
        assert back[k].shape == v.shape and back[k].dtype == v.dtype.newbyteorder("=")
        assert back[k].dtype.isnative
        np.testing.assert_array_equal(back[k], v)
    assert unpack_arrays(pack_arrays({})) == {}


def test_unpack_never_builds_object_arrays() -> None:
    head = orjson.dumps([{"name": "o", "dtype": "|O", "shape": [1]}])
    with pytest.raises(ValueError, match="object"):
        unpack_arrays(struct.pack("<I", len(head)) + head + b"\0" * 8)


def test_request_digest_is_stable_and_sees_names_dtypes_shapes_and_bytes() -> None:
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    t = np.array([1, 2, 3], np.int64)
    digest = request_digest({"x": x, "tok": t})
    assert digest == request_digest({"tok": t.copy(), "x": np.asfortranarray(x)})  # order and layout free
    # pinned: replays across processes, replicas and versions depend on this value not moving
    assert digest == "4c4a84f0658d93bc4507b4adb09b2054c6c09463dcf32801621322d75569ca45"
    by_hand = hashlib.sha256()  # the format: per name in sorted order, [name, dtype, shape] JSON then bytes
    for name, v in (("tok", t), ("x", x)):
        by_hand.update(orjson.dumps([name, v.dtype.str, list(v.shape)]) + v.tobytes())
    assert digest == by_hand.hexdigest()
    assert request_digest({"x": x.reshape(2, 3), "tok": t}) != digest
    assert request_digest({"x": x.astype(np.float64), "tok": t}) != digest
    assert request_digest({"y": x, "tok": t}) != digest
    bumped = x.copy()
    bumped[2, 1] = np.nextafter(bumped[2, 1], np.float32(np.inf))
    assert request_digest({"x": bumped, "tok": t}) != digest
