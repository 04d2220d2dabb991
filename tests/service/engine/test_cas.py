"""The CAS retry loop against a real Redis: a lost race is redone on the new record, within budget."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import replace

import pytest

from service.engine.cas import MAX_ATTEMPTS, rewrite
from service.errors import SessionNotFound, StepConflict
from service.store.store import SessionRecord, SessionStore, WriteOutcome

_ids = itertools.count()


async def created(store: SessionStore, owner: str = "alice") -> SessionRecord:
    now = time.time()
    record = SessionRecord(
        f"cas-{next(_ids)}-{now}", "m", "fp", 5, 1, (b"\1\2",), owner, now, now, 600, "digest", b"reply"
    )
    assert await store.create(record)
    return record


class Race:
    """Runs ``before`` between the loop's read and each of its writes (through the real store)."""

    def __init__(self, store: SessionStore, monkeypatch: pytest.MonkeyPatch, before: str) -> None:
        self.store, self.save, self.before, self.writes = store, store.save, before, 0
        monkeypatch.setattr(store, "save", self._save)

    async def _save(self, writes: Sequence[tuple[SessionRecord, int]]) -> list[WriteOutcome]:
        self.writes += 1
        key = writes[0][0].session_id
        if self.before == "delete":
            assert await self.store.delete(key)
        elif self.before == "write" or (self.before == "write-once" and self.writes == 1):
            (current,) = await self.store.load([key])
            assert isinstance(current, SessionRecord)
            bumped = replace(current, step=current.step + 1, revision=current.revision + 1)
            assert await self.save([(bumped, current.revision)]) == [WriteOutcome.OK]
        return await self.save(writes)


async def test_rewrite_applies_the_change_and_clears_the_replay(store: SessionStore) -> None:
    rec = await created(store)
    new = await rewrite(store, rec.session_id, "alice", lambda r: replace(r, step=0, states=(b"\0\0",)))
    assert (new.step, new.revision, new.states, new.last_digest, new.last_reply) == (0, 2, (b"\0\0",), "", b"")
    (stored,) = await store.load([rec.session_id], with_reply=True)
    assert isinstance(stored, SessionRecord)
    assert (stored.step, stored.revision, stored.last_digest) == (0, 2, "")
    assert stored.expires_in is not None and 590 < stored.expires_in <= 600  # the TTL is renewed


async def test_a_lost_race_is_redone_on_the_winners_record(
    store: SessionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec = await created(store)
    seen: list[int] = []

    def change(current: SessionRecord) -> SessionRecord:
        seen.append(current.step)
        return replace(current, step=current.step * 10)

    race = Race(store, monkeypatch, "write-once")
    new = await rewrite(store, rec.session_id, "alice", change)
    assert seen == [5, 6] and race.writes == 2  # the second attempt started from the winner's record
    assert (new.step, new.revision) == (60, 3)


async def test_a_session_that_keeps_changing_is_a_conflict_after_the_budget(
    store: SessionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec = await created(store)
    race = Race(store, monkeypatch, "write")
    with pytest.raises(StepConflict, match="'public-id' kept changing"):
        await rewrite(store, rec.session_id, "alice", lambda r: r, session_id="public-id")
    assert race.writes == MAX_ATTEMPTS


async def test_missing_foreign_and_deleted_sessions_are_not_found(
    store: SessionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(SessionNotFound, match="'nope' does not exist"):
        await rewrite(store, "absent-key", "alice", lambda r: r, session_id="nope")
    foreign = await created(store, owner="bob")
    with pytest.raises(SessionNotFound, match="does not exist"):  # another owner's: simply absent
        await rewrite(store, foreign.session_id, "alice", lambda r: r)
    rec = await created(store)
    Race(store, monkeypatch, "delete")
    with pytest.raises(SessionNotFound, match="was deleted"):
        await rewrite(store, rec.session_id, "alice", lambda r: r)
