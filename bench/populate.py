"""Fill a Redis with idle sessions the service believes are real: copies of one real record.

``template`` creates a session through the API, steps it once (without ``step``, so no replay
copy is kept: an idle session has none) and ``DUMP``s its record. ``populate`` then writes
copies of it under new ids, pipelined: per session a ``RESTORE`` with the record's TTL (its own
id inside, see ``dump_clone``), and in the same round trip the index entries that ``create``
would have made (``service.store.counting``): a member of the expiry set scored with a lower
bound of its expiry, and the owner's count. So the session count, the limits and every
route see them as sessions like any other.

The Redis must run with ``rdbcompression no`` (``DUMP`` then leaves the id readable).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import httpx
import redis as redis_py

from bench.dump_clone import DumpCloner
from service.sessions import new_session_id
from service.store.counting import INDEX_KEYS, member
from service.store.record import session_key

OWNER = ""  # the benchmark runs without API keys: every session is the anonymous owner's


@dataclass(frozen=True)
class Template:
    session_id: str
    payload: bytes  # DUMP of its record
    ttl_ms: int  # its PTTL right after the step
    step: int


def template(http: httpx.Client, raw: redis_py.Redis) -> Template:
    """One real session, created and stepped once through the API, and its record's DUMP."""
    sid = http.post("/v1/sessions", json={}).raise_for_status().json()["session_id"]
    step = http.post(f"/v1/sessions/{sid}/step", json={"inputs": {"tokens": [7]}}).raise_for_status().json()["step"]
    key = session_key(sid)
    if raw.exists(f"carryover:{{{sid}}}:r"):
        raise RuntimeError("a step without `step` kept a replay copy: an idle session would not have one")
    payload = raw.dump(key)
    if not isinstance(payload, bytes):
        raise RuntimeError(f"DUMP {key} returned {payload!r}")
    ttl_ms = int(raw.pttl(key))
    return Template(sid, payload, ttl_ms, int(step))


def redis_ms(raw: redis_py.Redis) -> int:
    """Redis's clock (ms): the index is scored in it, whatever this machine's clock says."""
    seconds, micros = raw.time()
    return int(seconds) * 1000 + int(micros) // 1000


def populate(
    raw: redis_py.Redis, tpl: Template, count: int, *, ttl_ms: int | None = None, batch: int = 1000
) -> tuple[list[str], float]:
    """``count`` copies of the template (TTL ``ttl_ms``, default the template's), indexed like a
    create. Returns their ids and the seconds it took."""
    cloner = DumpCloner(tpl.payload, tpl.session_id.encode())
    ttl = tpl.ttl_ms if ttl_ms is None else ttl_ms
    ids: list[str] = []
    started = time.perf_counter()
    while len(ids) < count:
        chunk = [new_session_id() for _ in range(min(batch, count - len(ids)))]
        # A lower bound of each copy's expiry (read before the copies exist), as RESERVE scores one.
        score = redis_ms(raw) + ttl
        pipe = raw.pipeline(transaction=False)
        for sid in chunk:
            pipe.restore(session_key(sid), ttl, cloner.clone(sid.encode()))
        pipe.zadd(INDEX_KEYS[0], {member(OWNER, sid): score for sid in chunk})
        pipe.hincrby(INDEX_KEYS[1], OWNER, len(chunk))
        pipe.execute()
        ids += chunk
    return ids, time.perf_counter() - started


def gone(raw: redis_py.Redis, ids: Iterable[str]) -> bool:
    """Whether every one of these sessions' keys has expired (Redis answers for an expired key
    as absent even before its active expiry cycle removed it)."""
    pipe = raw.pipeline(transaction=False)
    for sid in ids:
        pipe.exists(session_key(sid))
    return not any(pipe.execute())


def indexed(raw: redis_py.Redis) -> tuple[int, int]:
    """The index's view: members of the expiry set, and the anonymous owner's count."""
    return int(raw.zcard(INDEX_KEYS[0])), int(raw.hget(INDEX_KEYS[1], OWNER) or 0)
