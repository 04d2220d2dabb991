"""The records this process last wrote (or loaded), so a session's next step needs no load.

Redis stays the only source of truth: a cached record is only ever a guess at what Redis holds.
The scheduler admits a request from it only when the verdict would be "apply", and its write is
a compare-and-set on the cached record's revision *and* write token (``scripts.SAVE``), so a
stale guess (another replica, a reset, a delete + re-create that brought the revision number
back) loses the CAS and the step runs again from the record loaded from Redis. Reads (state,
info) never use it.

Bounded LRU: at most ``capacity`` sessions (0 = off); memory is about their state bytes.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace

from service.store.record import SessionRecord


class RecordCache:
    """A bounded LRU of ``SessionRecord`` by session id."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._records: OrderedDict[str, SessionRecord] = OrderedDict()

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
        if self.capacity <= 0 or not record.token:
            return
        self._records[record.session_id] = replace(record, last_reply=b"")  # replays read Redis
        self._records.move_to_end(record.session_id)
        while len(self._records) > self.capacity:
            self._records.popitem(last=False)

    def evict(self, session_id: str) -> None:
        """Forget the session (its write lost the CAS, or it was found missing)."""
        self._records.pop(session_id, None)
