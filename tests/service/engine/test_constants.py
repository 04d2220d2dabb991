"""Per-session constants: the contract's checks against a graph, a client's values checked at
create, their bytes, and padding a batch of sessions with different memory lengths."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from model_export.verify import unpadded_run
from service.engine.constants import constants_from_bytes, constants_to_bytes, pad_constants, validate_constants
from service.engine.contract import LENGTH, ModelContract, build_contract
from service.engine.metadata import DeclaredConstant, DeclaredContract
from service.engine.model import RecurrentModel
from service.errors import InvalidInput, ModelContractError, PayloadTooLarge
from tests.engines import running_engine
from tests.make_models import committed_example
from tests.service.engine.test_contract import Arg, Signature

MEMORY = DeclaredConstant("memory", 0, 1, "memory_mask")


def signature(memory: list[Any] | None = None, mask: tuple[str, list[Any]] = ("tensor(bool)", ["B", "L"])) -> Signature:
    return Signature(
        [
            Arg("x", "tensor(float)", ["B", "T", 2]),
            Arg("mask", "tensor(bool)", ["B", "T"]),
            Arg("h", "tensor(float)", ["B", 3]),
            Arg("memory", "tensor(float)", memory or ["B", "L", 4]),
            Arg("memory_mask", mask[0], mask[1]),
        ],
        [Arg("y", "tensor(float)", ["B", "T", 3]), Arg("hn", "tensor(float)", ["B", 3])],
    )


def contract(*constants: DeclaredConstant, graph: Signature | None = None) -> ModelContract:
    declared = DeclaredContract("sequence", "features", ["x"], ["y"], "mask", [("h", "hn", 0)], constants=constants)
    return build_contract(declared, graph or signature())


def test_a_constant_with_a_length_axis_and_its_mask() -> None:
    (c,) = contract(MEMORY).constants
    assert (c.name, c.shape, c.batch_axis, c.length_axis, c.mask, c.session_length_axis) == (
        "memory",
        (LENGTH, 4),
        0,
        1,
        "memory_mask",
        0,
    )
    assert c.describe() == {
        "name": "memory",
        "dtype": "float32",
        "shape": ["L", 4],
        "batch_axis": 0,
        "length_axis": 1,
        "mask": "memory_mask",
    }


@pytest.mark.parametrize(
    ("constant", "graph", "message"),
    [
        (DeclaredConstant("keys", 0, 1, "memory_mask"), None, "constant 'keys' is not a graph input"),
        (DeclaredConstant("memory", 0, 3, "memory_mask"), None, "length_axis 3 is outside its rank 3"),
        (DeclaredConstant("memory", 1, 1, "memory_mask"), None, "length_axis and batch_axis must differ"),
        (DeclaredConstant("memory", 0, 1, "nope"), None, "its mask 'nope' is not a graph input"),
        (MEMORY, signature(["B", "L", "D"]), "axis 2 is dynamic"),
        (MEMORY, signature(["B", 5, 4]), r"axis 1 \(L\) is fixed to 5"),
        (MEMORY, signature(mask=("tensor(int64)", ["B", "L"])), "must be \\[B, L\\] bool or float32"),
        (MEMORY, signature(mask=("tensor(bool)", ["B", "L", 1])), "must be \\[B, L\\] bool or float32"),
        (DeclaredConstant("x", 0, 1, "memory_mask"), None, "also declared as data"),
    ],
)
def test_bad_declarations_are_named(constant: DeclaredConstant, graph: Signature | None, message: str) -> None:
    with pytest.raises(ModelContractError, match=message):
        contract(constant, graph=graph)


def test_an_undeclared_constant_input_is_refused() -> None:
    with pytest.raises(ModelContractError, match="graph input 'memory' is not declared"):
        contract()


def test_validate_constants_accepts_one_sessions_slice() -> None:
    c = contract(MEMORY)
    memory = validate_constants(c, {"memory": [[1, 2, 3, 4], [5, 6, 7, 8.5]]}, 1 << 20)["memory"]
    assert memory.dtype == np.float32 and memory.shape == (2, 4)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (None, r"missing 'constants': this model needs \['memory'\]"),
        ({}, "missing 'constants'"),
        ([1], "'constants' must be an object"),
        ({"memory": [[1.0] * 4], "keys": [[1.0]]}, "unknown constant 'keys'"),
        ({"keys": [[1.0]]}, "unknown constant 'keys'"),
        ({"memory": [[1.0] * 3]}, r"constant 'memory' has shape \[1, 3\]; the model expects \[L, 4\]"),
        ({"memory": [1.0] * 4}, r"constant 'memory' has shape \[4\]"),
        ({"memory": []}, r"has shape \[0\]"),
        ({"memory": [[1.0] * 4, [1.0]]}, "must be a rectangular array"),
        ({"memory": [["a"] * 4]}, "must hold numbers"),
        ({"memory": [[1.0, float("nan"), 0.0, 0.0]]}, "constant 'memory' contains NaN or Inf"),
        ({"memory": [[1.0, 1e39, 0.0, 0.0]]}, "constant 'memory' contains NaN or Inf"),
    ],
)
def test_bad_constants_are_refused_naming_the_field(raw: object, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        validate_constants(contract(MEMORY), raw, 1 << 20)


def test_an_empty_memory_is_refused() -> None:
    with pytest.raises(InvalidInput, match="constant 'memory' is empty"):
        validate_constants(contract(MEMORY), {"memory": np.zeros((0, 4))}, 1 << 20)


def test_constants_over_the_size_limit_are_413() -> None:
    with pytest.raises(PayloadTooLarge, match="max_constant_bytes=64") as e:
        validate_constants(contract(MEMORY), {"memory": np.ones((5, 4))}, 64)
    assert e.value.status == 413 and "'memory'" in str(e.value)


def test_a_model_without_constants_takes_none() -> None:
    plain = build_contract(
        DeclaredContract("sequence", "features", ["x"], ["y"], "mask", [("h", "hn", 0)]),
        Signature(signature().inputs[:3], signature().outputs),
    )
    assert validate_constants(plain, None, 0) == {}
    with pytest.raises(InvalidInput, match="this model takes none"):
        validate_constants(plain, {"memory": [[1.0]]}, 1 << 20)


def test_bytes_round_trip_and_refuse_what_does_not_fit() -> None:
    c = contract(MEMORY)
    memory = np.arange(12, dtype=np.float32).reshape(3, 4)
    blobs, shapes = constants_to_bytes(c, {"memory": memory})
    assert shapes == ((3, 4),)
    np.testing.assert_array_equal(constants_from_bytes(c, blobs, shapes)["memory"], memory)
    with pytest.raises(ValueError, match="constant 'memory'"):
        constants_from_bytes(c, (blobs[0][:-4],), shapes)
    with pytest.raises(ValueError, match="record has 0 constants"):
        constants_from_bytes(c, (), ())


def test_pad_constants_pads_to_the_longest_and_masks_the_real_positions() -> None:
    c = contract(MEMORY)
    rows = [{"memory": np.full((n, 4), n, np.float32)} for n in (3, 7, 1)]
    feeds = pad_constants(c, rows)
    assert feeds["memory"].shape == (3, 7, 4) and feeds["memory_mask"].dtype == np.bool_
    np.testing.assert_array_equal(feeds["memory_mask"].sum(axis=1), [3, 7, 1])
    for i, n in enumerate((3, 7, 1)):
        np.testing.assert_array_equal(feeds["memory"][i, :n], rows[i]["memory"])
        assert not feeds["memory"][i, n:].any()


def test_pad_constants_along_a_batch_axis_that_is_not_first() -> None:
    graph = signature(["L", "B", 4])
    c = contract(DeclaredConstant("memory", 1, 0, "memory_mask"), graph=graph)
    (k,) = c.constants
    assert k.shape == (LENGTH, 4) and k.session_length_axis == 0
    feeds = pad_constants(c, [{"memory": np.ones((2, 4), np.float32)}, {"memory": np.ones((5, 4), np.float32)}])
    assert feeds["memory"].shape == (5, 2, 4)
    np.testing.assert_array_equal(feeds["memory"][:, 0].sum(axis=1), [4, 4, 0, 0, 0])
    np.testing.assert_array_equal(feeds["memory_mask"], [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])


def test_constants_sharing_a_mask_must_share_a_length() -> None:
    graph = signature()
    graph.inputs.append(Arg("values", "tensor(float)", ["B", "L", 2]))
    c = contract(MEMORY, DeclaredConstant("values", 0, 1, "memory_mask"), graph=graph)
    with pytest.raises(InvalidInput, match="share the mask 'memory_mask' but have lengths 2 and 3"):
        validate_constants(c, {"memory": np.ones((2, 4)), "values": np.ones((3, 2))}, 1 << 20)


async def test_sessions_of_different_memory_lengths_run_in_one_model_call(redis_url: str) -> None:
    """Through the real scheduler (real Redis): three sessions with memories of 3, 7 and 12
    positions step in one batch, each equal to its own unpadded run."""
    e = committed_example("attention_decoder")
    model = RecurrentModel(e.step, name="attn")
    rng = np.random.default_rng(3)
    memories = [rng.standard_normal((n, 10)).astype(np.float32) for n in (3, 7, 12)]
    tokens = [rng.integers(0, 11, t).astype(np.int64) for t in (4, 2, 5)]
    async with running_engine(redis_url, {"attn": model}) as service:
        ids = [(await service.create(constants={"memory": m})).session_id for m in memories]
        scheduler = service.schedulers["attn"]
        calls = scheduler.model_calls
        replies = await asyncio.gather(*(service.step(i, {"tokens": t}) for i, t in zip(ids, tokens, strict=True)))
        assert scheduler.model_calls - calls == 1 and scheduler.call_shapes[-1] == (3, 5)
        for reply, t, m in zip(replies, tokens, memories, strict=True):
            ref, _ = unpadded_run(model, {"tokens": t}, {"memory": m})
            np.testing.assert_allclose(reply.outputs["logits"], ref["logits"], atol=1e-5, rtol=0)
