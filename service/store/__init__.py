"""Session records in Redis: codec, CAS scripts, single node / cluster, embedded launcher."""

from service.store.store import SessionRecord, SessionStore, WriteOutcome, session_key

__all__ = ["SessionRecord", "SessionStore", "WriteOutcome", "session_key"]
