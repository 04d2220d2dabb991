"""The scheduler's reads of Redis: a batch's base records (the record cache first) and the stored
outputs of a replay. The verdicts are ``admission``'s; this module only says where records come
from.
"""

from __future__ import annotations

from service.engine.admission import cache_admits, replayed
from service.engine.batch import StepReply, StepRequest
from service.engine.record_cache import RecordCache
from service.errors import CarryoverError, StoreUnavailable
from service.store.store import Loaded, SessionStore


async def fetch_bases(
    store: SessionStore, cache: RecordCache, fresh: list[StepRequest], model: str, fingerprint: str
) -> tuple[list[Loaded], int]:
    """Per request, in order, the record to judge it on, and how many were loaded: a cached record
    where it admits the request (``r.cached`` is set), else the record loaded from Redis, all
    misses in one round trip. Raises ``StoreUnavailable`` for the whole batch."""
    records: list[Loaded] = []
    for r in fresh:
        cached = cache.get(r.session_id)
        r.cached = cache_admits(r, cached, model, fingerprint)
        records.append(cached if r.cached else None)
    missed = [i for i, r in enumerate(fresh) if not r.cached]
    if missed:
        loaded = await store.load([fresh[i].session_id for i in missed])
        for i, rec in zip(missed, loaded, strict=True):
            records[i] = rec
    return records, len(missed)


async def fetch_replay(store: SessionStore, r: StepRequest) -> StepReply | CarryoverError:
    """The request was already applied (its reply was lost): its stored outputs, read again."""
    try:
        (rec,) = await store.load([r.session_id], with_reply=True)
    except StoreUnavailable as e:
        return e
    return replayed(r, rec)
