"""Per-owner request rate limit: a token bucket in Redis, so it holds across replicas.

One key per owner, ``carryover:{rate:<owner>}:bucket`` (its own cluster slot), a hash of
``tokens`` and ``ts`` (ms, Redis's clock: replicas' clocks never matter). One script takes a
token atomically: refill at ``rate`` per second up to ``burst``, then take one or say how long
until one is back. The key expires once a full bucket would have refilled, so idle owners cost
nothing.
"""

from __future__ import annotations

from service.store.scripts import Call, Script

# KEYS: the bucket. ARGV: rate (tokens/s), burst (tokens). Returns {1, 0} taken or {0, wait_ms}.
TAKE = """
if redis.replicate_commands then redis.replicate_commands() end
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('TYPE', KEYS[1]).ok ~= 'hash' then redis.call('DEL', KEYS[1]) end
local h = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens, ts = tonumber(h[1]), tonumber(h[2])
if not tokens or not ts then tokens, ts = burst, now end
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate / 1000)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = math.ceil((1 - tokens) * 1000 / rate) end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
if wait > 0 then return {0, wait} end
return {1, 0}
"""

LIMIT_SCRIPTS = {s.name: s for s in (Script.of("rate_take", TAKE),)}


def bucket_key(owner: str) -> str:
    """The Redis key of an owner's token bucket."""
    return f"carryover:{{rate:{owner}}}:bucket"


def take_call(owner: str, rate: float, burst: int) -> Call:
    """The call that takes one token from ``owner``'s bucket (``burst`` 0: one second's worth)."""
    size = burst or max(1, round(rate))
    return (LIMIT_SCRIPTS["rate_take"], (bucket_key(owner),), (repr(float(rate)), size))
