"""What a batch's loaded record means for one request, and what a write keeps beside the state.

The one owner and model check of a step happens here, on the record the batch reads (the read its
compare-and-set write is based on); ``SessionService`` only routes the request to its scheduler.
Pure functions: the scheduler does the I/O and acts on the verdict.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import numpy as np

from service.engine.batch import StepReply, StepRequest
from service.engine.contract import ModelContract
from service.engine.tensors import pack_arrays, states_to_bytes, unpack_arrays
from service.errors import CarryoverError, ModelMismatch, SessionCorrupt, SessionNotFound, StepConflict
from service.store.record import new_write_token
from service.store.store import SessionRecord

Verdict = Literal["apply", "replay"] | CarryoverError


def admission(r: StepRequest, rec: SessionRecord | SessionCorrupt | None, model: str, fingerprint: str) -> Verdict:
    """``apply`` the request to ``rec``, ``replay`` its stored outputs, or fail it with the error."""
    if isinstance(rec, SessionCorrupt):  # fails this request only; the batch goes on
        return rec
    if rec is None or rec.owner != r.owner:
        return SessionNotFound(f"session {r.session_id!r} does not exist or has expired")
    if rec.fingerprint != fingerprint or rec.model != model:
        return ModelMismatch(f"session {r.session_id!r} holds state of another model")
    if r.expected_step is not None and r.expected_step != rec.step:
        if r.digest == rec.last_digest and r.expected_step + r.total_steps == rec.step:
            return "replay"
        return StepConflict(f"the session is at step {rec.step}, not {r.expected_step}", current_step=rec.step)
    return "apply"


def cache_admits(r: StepRequest, cached: SessionRecord | None, model: str, fingerprint: str) -> bool:
    """Whether ``r`` may run on the cached record without a load: only an "apply" verdict is
    ever taken from the cache (its write's CAS checks the guess); any other comes from Redis."""
    return cached is not None and admission(r, cached, model, fingerprint) == "apply"


def replayed(r: StepRequest, rec: SessionRecord | SessionCorrupt | None) -> StepReply | CarryoverError:
    """The stored outputs of ``r`` (already applied, its reply lost), read again ``with_reply``."""
    if isinstance(rec, SessionCorrupt):
        return rec
    if rec is None or rec.last_digest != r.digest:
        return StepConflict("the session changed while replaying", current_step=rec.step if rec else None)
    if not rec.last_reply:  # past the replay window, or outputs over replay_max_bytes
        return StepConflict(
            f"this request was already applied (the session is at step {rec.step}) but its outputs are "
            "no longer kept for a replay",
            current_step=rec.step,
        )
    return StepReply(r.session_id, rec.step, unpack_arrays(rec.last_reply), replay=True)


def last_prediction(contract: ModelContract, outputs: dict[str, np.ndarray]) -> bytes:
    """A token LM's last prediction (its first output's last timestep), kept in the record for a
    generation that continues without a prompt; other models keep none."""
    if contract.kind != "token_lm" or not contract.outputs:
        return b""
    name = contract.outputs[0].name
    return pack_arrays({name: outputs[name][-1:]})


def replay_copy(r: StepRequest, outputs: dict[str, np.ndarray], max_bytes: int) -> bytes:
    """The outputs kept for a retry: only for requests with ``step`` (no other can be replayed)
    and only up to ``max_bytes`` (b"": none kept, the save deletes an older copy)."""
    if r.expected_step is None or sum(v.nbytes for v in outputs.values()) > max_bytes:
        return b""
    return pack_arrays(outputs)


def written_record(
    r: StepRequest,
    base: SessionRecord,
    contract: ModelContract,
    outputs: dict[str, np.ndarray],
    now: float,
) -> SessionRecord:
    """The record ``r``'s write puts in place of ``base`` (the record it was read at): the step
    advanced, the next revision, the new state, what is kept beside it and its own write token
    (made here, so the store need not copy the record to add one)."""
    return replace(
        base,
        step=base.step + r.total_steps,
        revision=base.revision + 1,
        states=states_to_bytes(contract, r.states),
        updated_at=now,
        last_digest=r.digest if r.expected_step is not None else "",
        last_reply=b"",  # the replay copy is written beside the record (``replay_copy``), not kept in it
        last_prediction=last_prediction(contract, outputs),
        expires_in=None,
        token=new_write_token(),
    )
