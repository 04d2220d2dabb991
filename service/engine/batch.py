"""Batch assembly: the mechanics under the scheduler's policy (docs/architecture.md).

A request's inputs are cut into chunks; the chunks of one batch are padded into ``[B, T, ...]``
with a ``[B, T]`` mask (True where a row has a real timestep) and the rows' states stacked into
``[B, ...]``; the model's result is sliced back into each row's own outputs and state. Padding
is always at the end of a row, and the model carries the state through masked steps, so a row's
slice equals running its chunk alone. ``StepRequest`` is one request's progress through its
chunks (and, for a generation's row, through its iterations).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from service.engine.constants import pad_constants
from service.engine.contract import ModelContract
from service.engine.generation import Generation
from service.engine.model import BatchResult
from service.store.store import SessionRecord

Chunk = dict[str, np.ndarray]  # one request's inputs for some timesteps: name -> [T, ...]


@dataclass(frozen=True)
class StepReply:
    session_id: str
    step: int  # the session's step count after this request
    outputs: dict[str, np.ndarray]  # [T, ...] per output
    replay: bool = False


@dataclass(eq=False)
class StepRequest:
    """One validated step request; ``chunks`` are its inputs cut at ``max_chunk`` steps."""

    session_id: str
    owner: str
    chunks: list[Chunk]
    expected_step: int | None
    digest: str
    future: asyncio.Future[StepReply]
    arrival: int = 0  # key in the scheduler's queue
    next_chunk: int = 0
    base: SessionRecord | None = None  # the record as loaded before chunk 0
    cached: bool = False  # base came from the record cache, not from Redis (a guess the CAS checks)
    states: dict[str, np.ndarray] = field(default_factory=dict)  # after the chunks applied so far
    constants: dict[str, np.ndarray] = field(default_factory=dict)  # the session's, as loaded with base
    outputs: list[dict[str, np.ndarray]] = field(default_factory=list)
    attempts: int = 0
    queued_at: float = field(default_factory=time.perf_counter)  # for the queue-wait histogram
    generation: Generation | None = None  # set for a generation's row: it re-enters the queue

    @property
    def total_steps(self) -> int:
        return sum(chunk_steps(c) for c in self.chunks)

    @property
    def chunk_steps(self) -> int:
        # An empty prompt has no chunk yet: its first token is sampled at admission.
        return chunk_steps(self.chunks[self.next_chunk]) if self.chunks else 1

    def restart(self) -> None:
        """Forget progress: nothing of it was written, so the request runs again from Redis."""
        self.next_chunk, self.base, self.states, self.outputs, self.cached = 0, None, {}, [], False
        self.attempts += 1
        if self.generation is not None:
            self.generation.restart()
            self.chunks = self.generation.prompt_chunks


@dataclass(frozen=True)
class PaddedBatch:
    """What ``RecurrentModel.run`` takes."""

    inputs: dict[str, np.ndarray]  # [B, T, ...]
    mask: np.ndarray  # [B, T] bool
    states: dict[str, np.ndarray]  # [B, ...]
    constants: dict[str, np.ndarray] = field(default_factory=dict)  # graph feeds, see ``pad_constants``


@dataclass(frozen=True)
class RowResult:
    """One row's share of a batch result: its real timesteps only."""

    outputs: dict[str, np.ndarray]  # [T_row, ...]
    states: dict[str, np.ndarray]  # the session's slice, no batch axis


def chunk_steps(chunk: Mapping[str, np.ndarray]) -> int:
    """Timesteps in a chunk (every input has the same leading T)."""
    for value in chunk.values():  # the first one; a loop is the cheapest way to it (hot path)
        return int(value.shape[0])
    raise ValueError("a chunk has at least one input")


def split_chunks(inputs: Mapping[str, np.ndarray], max_chunk: int) -> list[Chunk]:
    """Cut a request's inputs into chunks of at most ``max_chunk`` timesteps (views, no copies)."""
    steps = chunk_steps(inputs)
    return [{k: v[i : i + max_chunk] for k, v in inputs.items()} for i in range(0, steps, max_chunk)]


def join_chunks(outputs: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The per-chunk outputs of one request joined back along T (one chunk: as they are)."""
    if len(outputs) == 1:
        return dict(outputs[0])
    return {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}


def pad_batch(
    contract: ModelContract,
    chunks: Sequence[Mapping[str, np.ndarray]],
    states: Sequence[Mapping[str, np.ndarray]],
    constants: Sequence[Mapping[str, np.ndarray]] = (),
) -> PaddedBatch:
    """Right-pad the rows' chunks (zeros, mask False) to the longest; stack the rows' states;
    pad the rows' constants (if the model has any) along their length axes."""
    width = max(chunk_steps(c) for c in chunks)
    mask = np.zeros((len(chunks), width), bool)
    inputs = {t.name: np.zeros((len(chunks), width, *t.shape), t.dtype) for t in contract.inputs}
    for i, chunk in enumerate(chunks):
        n = chunk_steps(chunk)
        mask[i, :n] = True
        for name, value in chunk.items():
            inputs[name][i, :n] = value
    stacked = {s.input: np.stack([row[s.input] for row in states]) for s in contract.states}
    return PaddedBatch(inputs, mask, stacked, pad_constants(contract, constants) if contract.constants else {})


def pad_rows(contract: ModelContract, rows: Sequence[StepRequest]) -> PaddedBatch:
    """``pad_batch`` of the requests' current chunks, states and constants."""
    chunks = [r.chunks[r.next_chunk] for r in rows]
    return pad_batch(contract, chunks, [r.states for r in rows], [r.constants for r in rows])


def unpad_rows(result: BatchResult, steps: Sequence[int]) -> list[RowResult]:
    """Slice a batch result back into each row's outputs (its first ``steps[i]`` timesteps) and state."""
    return [
        RowResult({k: v[i, :n] for k, v in result.outputs.items()}, {k: v[i] for k, v in result.states.items()})
        for i, n in enumerate(steps)
    ]
