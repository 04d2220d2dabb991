"""Batch assembly: the mechanics under the scheduler's policy (docs/architecture.md).

A request's inputs are cut into chunks; the chunks of one batch are padded into ``[B, T, ...]``
with a ``[B, T]`` mask (True where a row has a real timestep) and the rows' states stacked into
``[B, ...]``; the model's result is sliced back into each row's own outputs and state. Padding
is always at the end of a row, and the model carries the state through masked steps, so a row's
slice equals running its chunk alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from service.engine.contract import ModelContract
from service.engine.model import BatchResult

Chunk = dict[str, np.ndarray]  # one request's inputs for some timesteps: name -> [T, ...]


@dataclass(frozen=True)
class PaddedBatch:
    """What ``RecurrentModel.run`` takes."""

    inputs: dict[str, np.ndarray]  # [B, T, ...]
    mask: np.ndarray  # [B, T] bool
    states: dict[str, np.ndarray]  # [B, ...]


@dataclass(frozen=True)
class RowResult:
    """One row's share of a batch result: its real timesteps only."""

    outputs: dict[str, np.ndarray]  # [T_row, ...]
    states: dict[str, np.ndarray]  # the session's slice, no batch axis


def chunk_steps(chunk: Mapping[str, np.ndarray]) -> int:
    """Timesteps in a chunk (every input has the same leading T)."""
    return int(next(iter(chunk.values())).shape[0])


def split_chunks(inputs: Mapping[str, np.ndarray], max_chunk: int) -> list[Chunk]:
    """Cut a request's inputs into chunks of at most ``max_chunk`` timesteps (views, no copies)."""
    steps = chunk_steps(inputs)
    return [{k: v[i : i + max_chunk] for k, v in inputs.items()} for i in range(0, steps, max_chunk)]


def join_chunks(outputs: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The per-chunk outputs of one request joined back along T."""
    return {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}


def pad_batch(
    contract: ModelContract, chunks: Sequence[Mapping[str, np.ndarray]], states: Sequence[Mapping[str, np.ndarray]]
) -> PaddedBatch:
    """Right-pad the rows' chunks (zeros, mask False) to the longest; stack the rows' states."""
    width = max(chunk_steps(c) for c in chunks)
    mask = np.zeros((len(chunks), width), bool)
    inputs = {t.name: np.zeros((len(chunks), width, *t.shape), t.dtype) for t in contract.inputs}
    for i, chunk in enumerate(chunks):
        n = chunk_steps(chunk)
        mask[i, :n] = True
        for name, value in chunk.items():
            inputs[name][i, :n] = value
    stacked = {s.input: np.stack([row[s.input] for row in states]) for s in contract.states}
    return PaddedBatch(inputs, mask, stacked)


def unpad_rows(result: BatchResult, steps: Sequence[int]) -> list[RowResult]:
    """Slice a batch result back into each row's outputs (its first ``steps[i]`` timesteps) and state."""
    return [
        RowResult({k: v[i, :n] for k, v in result.outputs.items()}, {k: v[i] for k, v in result.states.items()})
        for i, n in enumerate(steps)
    ]
