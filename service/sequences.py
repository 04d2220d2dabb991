"""What a protocol with sequence flags needs beside ``SessionService`` (``/v2``, Triton's
sequence extension): start a sequence's session over, and run inputs without any session.
Transport-neutral, at the layer of ``service.sessions`` (transports call it, it calls the engine).

A sequence's session has a *derived* id: ``~`` + an id that follows the session id rule. The
``~`` is outside the rule, so no client can choose such an id, and a transport's names cannot
collide with client-chosen ones; ``SessionService`` looks derived ids up like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from service.engine.cas import MAX_ATTEMPTS
from service.engine.validation import validate_inputs
from service.errors import InvalidInput, SessionExists, SessionNotFound
from service.sessions import SessionService, is_session_id


def is_derived_id(value: str) -> bool:
    """``~`` + an id that follows the session id rule: named by a transport, never by a client."""
    return value[:1] == "~" and is_session_id(value[1:])


async def start_over(
    sessions: SessionService, session_id: str, model: str, inputs: Mapping[str, Any], owner: str = ""
) -> None:
    """The derived session ``session_id`` at the initial state: created, or reset when it exists
    (a sequence that starts again). ``inputs`` (of the step that follows) are checked first, so a
    bad request never resets anything."""
    if not is_derived_id(session_id):
        raise InvalidInput(f"{session_id!r:.140} is not a derived session id")
    validate_inputs(sessions.model(model).contract, inputs, sessions.settings.max_steps_per_request)
    for _ in range(MAX_ATTEMPTS):  # create, else reset; again if it is deleted in between
        with contextlib.suppress(SessionExists):
            await sessions.create(model=model, session_id=session_id, owner=owner, derived=True)
            return
        with contextlib.suppress(SessionNotFound):
            await sessions.reset(session_id, owner)
            return
    raise SessionExists(f"session {session_id!r:.140} keeps changing; try again")


async def run_fresh(sessions: SessionService, model: str, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``inputs`` (leading T axis) run alone from the initial state, nothing stored: the
    ``[T, ...]`` outputs. In a worker thread beside the batcher (there is no session for it to
    load or write); bounded by ``max_steps_per_request`` like every step."""
    served = sessions.model(model)
    if served.contract.constants:  # nothing stored, so nowhere to give them: a sequence needs /v1
        names = [c.name for c in served.contract.constants]
        raise InvalidInput(f"model {model!r} needs per-session constants {names}: create its session over /v1")
    arrays = validate_inputs(served.contract, inputs, sessions.settings.max_steps_per_request)
    mask = np.ones((1, next(iter(arrays.values())).shape[0]), dtype=bool)
    batch = {name: a[None] for name, a in arrays.items()}
    result = await asyncio.to_thread(served.run, batch, mask, served.contract.initial_states(1))
    return {name: out[0] for name, out in result.outputs.items()}
