"""Parsing what a model declares: the ``constants`` of the metadata and the ``--constant`` flag
(the rest of the metadata is covered with the contract it builds, in test_contract.py)."""

from __future__ import annotations

import json

import pytest

from service.engine.metadata import DeclaredConstant, declared_from_pairs, parse_constant, parse_metadata
from service.errors import ModelContractError

BASE = {"inputs": ["tokens"], "outputs": ["logits"], "mask": "mask", "state": [{"input": "h", "output": "hn"}]}


def meta(**extra: object) -> str:
    return json.dumps(BASE | extra)


def test_constants_are_parsed_with_their_defaults() -> None:
    declared = parse_metadata(
        meta(constants=[{"input": "memory", "length_axis": 1, "mask": "memory_mask"}, {"input": "speaker"}])
    )
    assert declared.constants == (DeclaredConstant("memory", 0, 1, "memory_mask"), DeclaredConstant("speaker"))
    assert parse_metadata(meta()).constants == ()


@pytest.mark.parametrize(
    ("constants", "message"),
    [
        ({"input": "memory"}, "'constants' must be a list"),
        ([{"batch_axis": 0}], r"constants\[0\] must have a string 'input'"),
        ([{"input": "memory", "length_axis": "1", "mask": "m"}], "must be integers"),
        ([{"input": "memory", "batch_axis": True}], "must be integers"),
        ([{"input": "memory", "length_axis": 1}], "'length_axis' and 'mask' go together"),
        ([{"input": "memory", "mask": "m"}], "'length_axis' and 'mask' go together"),
        ([{"input": "memory", "mask": 3, "length_axis": 1}], "'mask' must name a graph input"),
        ([{"input": "memory", "length": 1}], r"unknown field\(s\) \['length'\]"),
    ],
)
def test_bad_constants_are_named(constants: object, message: str) -> None:
    with pytest.raises(ModelContractError, match=message):
        parse_metadata(meta(constants=constants))


def test_constant_flag() -> None:
    assert parse_constant("memory:0:1:memory_mask") == DeclaredConstant("memory", 0, 1, "memory_mask")
    assert parse_constant("speaker:0") == DeclaredConstant("speaker", 0)
    for bad in ("memory", "memory:0:1", "memory:a:1:m", "memory:0:1:"):
        with pytest.raises(ModelContractError, match="constant"):
            parse_constant(bad)


def test_flags_take_constants_and_their_masks_out_of_the_data() -> None:
    declared = declared_from_pairs(
        ["h:hn"],
        ["tokens", "mask", "h", "memory", "memory_mask"],
        ["logits", "hn"],
        constants=["memory:0:1:memory_mask"],
    )
    assert declared.inputs == ["tokens"] and declared.constants == (DeclaredConstant("memory", 0, 1, "memory_mask"),)
