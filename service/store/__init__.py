"""Session records in Redis: record codec, CAS scripts, single node / cluster, redis-server launcher."""

from service.store.record import Loaded, SessionRecord, WriteOutcome, session_key
from service.store.store import SessionStore

__all__ = ["Loaded", "SessionRecord", "SessionStore", "WriteOutcome", "session_key"]
