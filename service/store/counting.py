"""Session counting in O(1): an index kept by the create and delete paths, expiry reconciled lazily.

Counting by ``SCAN`` costs O(every key) (a million idle sessions: about a second of Redis busy
scanning), so the store keeps an index instead, two keys in one cluster slot (hash tag
``{index}``, so each script below is atomic on one node):

* ``carryover:{index}:expiry``, a sorted set: one member per session (``owner \\n stored id``),
  scored by a *lower bound* of its expiry time in Redis's clock (ms);
* ``carryover:{index}:owners``, a hash: live members per owner.

``ZCARD`` is the server's count and ``HGET`` an owner's, both O(1). Create reserves its member
before writing the record (``RESERVE``, which also enforces both limits atomically, so replicas
racing to create cannot overshoot them); delete removes it in the same pipeline as the ``DEL``.

Expiry needs no notification: a session's TTL only ever moves later (every access refreshes
it), so a member whose score is still in the future is certainly live. Members whose score has
passed are *due*: ``tally`` asks each due session's ``PTTL`` and either removes it (gone) or
moves its score to the new lower bound (now + PTTL), then counts. So each session is re-checked
at most once per TTL period, whatever the number of sessions, and counts are exact after a
tally up to ``MAX_ROUNDS * DUE_BATCH`` due members (more are counted as live until the next
tally picks them up). A fresh member is scored ``min(ttl, RECHECK_MS)`` ahead, so a create that
was cut off between reserving and writing (an outage) is counted for at most that long.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from service.store.scripts import Call, Script

INDEX_KEYS = ("carryover:{index}:expiry", "carryover:{index}:owners")
RECHECK_MS = 60_000  # a new member is re-checked this soon (bounds a phantom from a failed create)
DUE_BATCH = 500  # due members checked per round
MAX_ROUNDS = 8  # rounds per tally: its cost stays bounded even after a mass expiry

# Redis 7 replicates scripts by effects already; older ones need this before TIME and writes.
_NOW = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: expiry zset, owners hash. ARGV: member, owner, ttl_ms, max_total, max_owner (0 = off).
# Returns 1 reserved, 2 already indexed (a re-create of a due member, or a retried create),
# -1 the server is full, -2 the owner is.
RESERVE = (
    _NOW
    + """
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 2 end
local max_total, max_owner = tonumber(ARGV[4]), tonumber(ARGV[5])
if max_total > 0 and redis.call('ZCARD', KEYS[1]) >= max_total then return -1 end
if max_owner > 0 and tonumber(redis.call('HGET', KEYS[2], ARGV[2]) or '0') >= max_owner then return -2 end
redis.call('ZADD', KEYS[1], now + math.min(tonumber(ARGV[3]), RECHECK_MS), ARGV[1])
redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
return 1
""".replace("RECHECK_MS", str(RECHECK_MS))
)

# KEYS: expiry zset, owners hash. ARGV: member, owner. Returns 1 removed, 0 not indexed.
RELEASE = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
if redis.call('HINCRBY', KEYS[2], ARGV[2], -1) <= 0 then redis.call('HDEL', KEYS[2], ARGV[2]) end
return 1
"""

# KEYS: expiry zset, owners hash. ARGV: owner, limit.
# Returns {total, the owner's count, {member, score, member, score, ...} of up to limit due ones}.
TALLY = (
    _NOW
    + """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[2]))
return {redis.call('ZCARD', KEYS[1]), tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0'), due}
"""
)

# KEYS: expiry zset, owners hash. ARGV: (member, owner, score read, pttl_ms) repeated.
# A member whose score changed since it was read (deleted and created again) is left alone.
SETTLE = (
    _NOW
    + """
for i = 1, #ARGV, 4 do
  local member, owner, pttl = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 3])
  local score = redis.call('ZSCORE', KEYS[1], member)
  if score and tonumber(score) == tonumber(ARGV[i + 2]) then
    if pttl == -2 then
      redis.call('ZREM', KEYS[1], member)
      if redis.call('HINCRBY', KEYS[2], owner, -1) <= 0 then redis.call('HDEL', KEYS[2], owner) end
    else
      if pttl < 0 then pttl = RECHECK_MS end  -- no expiry (set by hand): look again later
      redis.call('ZADD', KEYS[1], 'XX', now + pttl, member)
    end
  end
end
return 1
""".replace("RECHECK_MS", str(RECHECK_MS))
)

PTTL = "return redis.call('PTTL', KEYS[1])"
DELETE = "return redis.call('DEL', KEYS[1])"

COUNTING_SCRIPTS = {
    s.name: s
    for s in (
        Script.of("index_reserve", RESERVE),
        Script.of("index_release", RELEASE),
        Script.of("index_tally", TALLY),
        Script.of("index_settle", SETTLE),
        Script.of("key_pttl", PTTL),
        Script.of("key_delete", DELETE),
    )
}
RESERVED, INDEXED, SERVER_FULL, OWNER_FULL = 1, 2, -1, -2

Runner = Callable[[Sequence[Call]], Awaitable[list[Any]]]


@dataclass(frozen=True, slots=True)
class Tally:
    """Live sessions: of the whole store and of one owner."""

    total: int
    owned: int


def member(owner: str, stored_id: str) -> str:
    """The index member of a session (an owner is hex or empty: never holds a newline)."""
    return f"{owner}\n{stored_id}"


def reserve_call(owner: str, stored_id: str, ttl_s: int, max_total: int, max_owner: int) -> Call:
    script = COUNTING_SCRIPTS["index_reserve"]
    return (script, INDEX_KEYS, (member(owner, stored_id), owner, ttl_s * 1000, max_total, max_owner))


def release_call(owner: str, stored_id: str) -> Call:
    return (COUNTING_SCRIPTS["index_release"], INDEX_KEYS, (member(owner, stored_id), owner))


async def tally(run: Runner, owner: str, key_of: Callable[[str], str]) -> Tally:
    """Reconcile due members (bounded: ``MAX_ROUNDS``), then count. ``key_of`` maps a stored id
    to its Redis key."""
    for _ in range(MAX_ROUNDS):
        [(total, owned, flat)] = await run([(COUNTING_SCRIPTS["index_tally"], INDEX_KEYS, (owner, DUE_BATCH))])
        if not flat:
            break
        due = [(_text(m), s) for m, s in zip(flat[::2], flat[1::2], strict=True)]
        ttls = await run([(COUNTING_SCRIPTS["key_pttl"], (key_of(m.partition("\n")[2]),), ()) for m, _ in due])
        args: list[bytes | str | int] = []
        for (m, score), pttl in zip(due, ttls, strict=True):
            args += (m, m.partition("\n")[0], score, int(pttl))
        await run([(COUNTING_SCRIPTS["index_settle"], INDEX_KEYS, args)])
    else:
        [(total, owned, _)] = await run([(COUNTING_SCRIPTS["index_tally"], INDEX_KEYS, (owner, 0))])
    return Tally(int(total), int(owned))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
