"""The store's Lua scripts, sent by SHA (``EVALSHA``); see docs/decisions.md for why scripts and
not Redis Functions.

Each touches only a session's own keys (``KEYS[1]``, its hash; for save and replay loads also
``KEYS[2]``, its replay copy: one hash tag, so one cluster slot) and is atomic: Redis runs a
script to the end or, if it is refused before its first write (e.g. OOM), not at all. Each first
asks the key's ``TYPE``, so a key holding another Redis type (garbage written by someone else) is
never a WRONGTYPE error that would fail a whole pipeline: ``load`` reports it (the record decodes
as corrupt; a replay key of another type reads as no copy), ``create`` finds the id taken,
``save`` sees a conflict (the caller's reload then reports it as corrupt).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

# ARGV: ttl_ms, write token, field, value, ...
# Returns 1 created, 0 exists.
CREATE = """
local t = redis.call('TYPE', KEYS[1]).ok
if t ~= 'none' then
  -- Our own create, re-sent by a client retry after the reply was lost: it did apply.
  if t == 'hash' and redis.call('HGET', KEYS[1], 'w') == ARGV[2] then return 1 end
  return 0
end
redis.call('HSET', KEYS[1], 'w', ARGV[2], unpack(ARGV, 3))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""

# The CAS is on ``revision``, a counter bumped by every write, never on ``step``: a reset sets the
# step back to 0, so a step-count CAS can be fooled (ABA): a writer reads step 5, someone resets
# and steps the session back to 5, and the stale write would succeed over a different history.
# KEYS: the session's hash, its replay key (same hash tag, so the same cluster slot).
# ARGV: expected revision, ttl_ms, write token, new revision, replay_ms, replay bytes, field, value, ...
# Returns 1 applied, 0 conflict, -1 missing. The whole hash is replaced (every field deleted, then
# HSET), so no field of an older record (e.g. a state tensor the new one lacks) survives, except
# the per-session constants (fields starting with ``k``, byte 107): written once at create, never
# sent again. The replay copy is set (for replay_ms) or deleted in the same atomic step, so it
# always belongs to the hash's last write.
SAVE = """
local t = redis.call('TYPE', KEYS[1]).ok
if t == 'none' then return -1 end
if t ~= 'hash' then return 0 end
local cur = redis.call('HMGET', KEYS[1], 'revision', 'w')
if not cur[1] then return -1 end
if cur[1] ~= ARGV[1] then
  -- Our own write, re-sent by a client retry after the reply was lost: it did apply.
  if cur[1] == ARGV[4] and cur[2] == ARGV[3] then return 1 end
  return 0
end
local drop = {}
for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
  if string.byte(f, 1) ~= 107 then drop[#drop + 1] = f end
end
if #drop > 0 then redis.call('HDEL', KEYS[1], unpack(drop)) end
redis.call('HSET', KEYS[1], 'w', ARGV[3], unpack(ARGV, 7))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if ARGV[6] == '' then
  redis.call('DEL', KEYS[2])
else
  redis.call('SET', KEYS[2], ARGV[6], 'PX', ARGV[5])
end
return 1
"""

# Read and refresh the TTL in one step; returns nil (no key), the key's type (not a hash), or
# {flat field/value list, pttl_ms, replay}. Batch loads pass one key; a replay passes the replay
# key as KEYS[2] too and gets its value (false when expired or never kept), read atomically with
# the hash, so the copy matches the hash's ``last_digest``.
LOAD = """
local t = redis.call('TYPE', KEYS[1]).ok
if t == 'none' then return false end
if t ~= 'hash' then return t end
local h = redis.call('HGETALL', KEYS[1])
local ttl = tonumber(redis.call('HGET', KEYS[1], 'ttl_s'))
if ttl and ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) end
local replay = false
if #KEYS > 1 and redis.call('TYPE', KEYS[2]).ok == 'string' then replay = redis.call('GET', KEYS[2]) end
return {h, redis.call('PTTL', KEYS[1]), replay}
"""


@dataclass(frozen=True, slots=True)
class Script:
    """A script's source and the SHA1 that Redis names it by."""

    name: str
    source: bytes
    sha: str

    @classmethod
    def of(cls, name: str, source: str) -> Script:
        body = source.encode()
        return cls(name, body, hashlib.sha1(body).hexdigest())


SCRIPTS = {s.name: s for s in (Script.of("create", CREATE), Script.of("save", SAVE), Script.of("load", LOAD))}

# One scripted call as the store pipelines it: the script, its KEYS (all in one cluster slot), ARGV.
Call = tuple[Script, tuple[str, ...], Sequence[bytes | str | int]]
