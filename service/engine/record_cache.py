"""The records this process last wrote (or loaded), so a session's next step needs no load.

Redis stays the only source of truth: a cached record is only ever a guess at what Redis holds.
The scheduler admits a request from it only when the verdict would be "apply", and its write is
a compare-and-set on the cached record's revision *and* write token (``scripts.SAVE``), so a
stale guess (another replica, a reset, a delete + re-create that brought the revision number
back) loses the CAS and the step runs again from the record loaded from Redis. Reads (state,
info) never use it.

Bounded LRU: at most ``capacity`` sessions (0 = off); memory is about their state bytes.

A session another writer keeps changing (HTTP requests spread over replicas by a load balancer)
would lose the CAS on every step, paying a wasted model run and a reload each time; so a session
whose cached record turned out stale is not cached again for ``SHARED_HOLD_S``: its steps load
from Redis, as without the cache, and only sessions that stay with one process are cached.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import replace

from service.store.record import SessionRecord

# How long a session found changed by another writer is left uncached (seconds).
SHARED_HOLD_S = 60.0


class RecordCache:
    """A bounded LRU of ``SessionRecord`` by session id."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._records: OrderedDict[str, SessionRecord] = OrderedDict()
        self._shared: OrderedDict[str, float] = OrderedDict()  # session id -> when found stale

    def __len__(self) -> int:
        return len(self._records)

    def get(self, session_id: str) -> SessionRecord | None:
        """The cached record (now the most recently used), or None."""
        record = self._records.get(session_id)
        if record is not None:
            self._records.move_to_end(session_id)
        return record

    def put(self, record: SessionRecord) -> None:
        """Remember ``record`` as the session's last known write; evicts the least recently used
        session beyond ``capacity``. Only records with a write token are kept (the CAS needs it)."""
        if self.capacity <= 0 or not record.token or self._is_shared(record.session_id):
            return
        # Replays read Redis, so the cache keeps no replay copy.
        self._records[record.session_id] = replace(record, last_reply=b"") if record.last_reply else record
        self._records.move_to_end(record.session_id)
        while len(self._records) > self.capacity:
            self._records.popitem(last=False)

    def evict(self, session_id: str, *, stale: bool = False) -> None:
        """Forget the session (its write lost the CAS, or it was found missing). ``stale``: the
        cached record had been overtaken by another writer; leave the session uncached a while."""
        self._records.pop(session_id, None)
        if stale and self.capacity > 0:
            self._shared[session_id] = time.monotonic()
            self._shared.move_to_end(session_id)
            while len(self._shared) > self.capacity:
                self._shared.popitem(last=False)

    def _is_shared(self, session_id: str) -> bool:
        since = self._shared.get(session_id)
        if since is None:
            return False
        if time.monotonic() - since < SHARED_HOLD_S:
            return True
        del self._shared[session_id]
        return False
