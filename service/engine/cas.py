"""The one retry policy for compare-and-set writes that lose a race.

Every session write is a CAS on the revision it was read at (the store does the compare and
set); a write that loses (a step or another replica wrote first) is redone from the new record,
at most ``MAX_ATTEMPTS`` times, then the caller gets a ``StepConflict``. The scheduler reruns a
step request on the new state within this budget; ``rewrite`` is the loop for writes that are not
steps (reset, state import).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

from service.errors import SessionCorrupt, SessionNotFound, StepConflict
from service.store.store import SessionRecord, SessionStore, WriteOutcome

MAX_ATTEMPTS = 8  # CAS losses before giving up with a conflict


async def rewrite(
    store: SessionStore,
    key: str,
    owner: str,
    change: Callable[[SessionRecord], SessionRecord],
    *,
    session_id: str | None = None,
) -> SessionRecord:
    """Read → ``change`` → compare-and-set, again if someone wrote in between; the written record.

    ``key`` is the store id, ``owner`` must own the record (else it does not exist for them),
    ``session_id`` is the id errors name (default ``key``). The write is not a step: it clears
    the replay copy and renews the TTL.
    """
    shown = session_id if session_id is not None else key
    for _ in range(MAX_ATTEMPTS):
        (current,) = await store.load([key])
        if isinstance(current, SessionCorrupt):
            raise current
        if current is None or current.owner != owner:
            raise SessionNotFound(f"session {shown!r} does not exist or has expired")
        new = replace(
            change(current),
            revision=current.revision + 1,
            updated_at=time.time(),
            last_digest="",
            last_reply=b"",
            last_prediction=b"",
            expires_in=float(current.ttl_s),
            token="",  # the save writes a fresh one
        )
        (outcome,) = await store.save([(new, current.revision)])
        if outcome is WriteOutcome.OK:
            return new
        if outcome is WriteOutcome.MISSING:
            raise SessionNotFound(f"session {shown!r} was deleted")
    raise StepConflict(f"session {shown!r} kept changing; try again")
