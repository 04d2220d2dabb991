"""A session's record and its Redis encoding (docs/contract.md §2).

Layout: key ``carryover:{<session_id>}:s`` (the hash tag keeps a session's keys in one cluster
slot), one hash whose fields are ``revision`` and ``ttl_s`` (read by the scripts), ``meta`` (one
JSON object with the other scalar fields), the state tensors as raw bytes in fields ``s0``,
``s1``, … in declared order, and ``w``, a random token naming the write that produced it (see
``scripts.SAVE``); for token LMs ``p``, the last prediction (what generation continues from);
for a model with per-session constants ``k0``, ``k1``, … and ``kshape`` (written at create, kept
by every save).
The last request's outputs, for an idempotent replay, live apart under
``carryover:{<session_id>}:r`` (a string with a short TTL, the retry window), so a session's
memory is its state, not its last reply.

A key that does not hold a well-formed record (garbage, another program's data, a field missing,
a gap in the state fields) decodes to a ``SessionCorrupt`` error value, never an exception: it
fails only that session's requests, not the batch it was loaded with.
"""

from __future__ import annotations

import enum
import itertools
import os
import secrets
from dataclasses import dataclass, field, fields

import orjson

from service.errors import SessionCorrupt

KEY_PREFIX = "carryover:{"
KEY_SUFFIX = "}:s"
REPLAY_SUFFIX = "}:r"
KEY_PATTERN = f"{KEY_PREFIX}*{KEY_SUFFIX}"  # SCAN MATCH for every session key


def session_key(session_id: str) -> str:
    """The Redis key of a session's record."""
    return f"{KEY_PREFIX}{session_id}{KEY_SUFFIX}"


def replay_key(session_id: str) -> str:
    """The Redis key of a session's replay copy (same hash tag: same cluster slot)."""
    return f"{KEY_PREFIX}{session_id}{REPLAY_SUFFIX}"


@dataclass(frozen=True, slots=True)
class SessionRecord:
    session_id: str  # the stored id (already namespaced by the caller)
    model: str  # model name
    fingerprint: str  # model fingerprint (hex)
    step: int  # timesteps consumed
    revision: int  # CAS counter, +1 on every successful write; starts at 1 on create
    states: tuple[bytes, ...]  # raw little-endian state tensors, declared order
    owner: str  # hash of the creating API key, "" if none
    created_at: float  # unix seconds
    updated_at: float
    ttl_s: int  # this session's TTL in seconds
    last_digest: str = ""  # digest of the last applied request (idempotent replay)
    # Opaque serialized outputs of the last applied request, for a replay: not a hash field but its
    # own key; written by ``save`` (b"": none kept), read only by ``load(with_reply=True)``.
    last_reply: bytes = b""
    # A token LM's prediction after the last consumed token (its first output's last timestep,
    # packed): what a generation with an empty prompt continues from. Hash field ``p``, small.
    last_prediction: bytes = b""
    # Per-session constants (e.g. an attention decoder's encoder outputs): raw little-endian
    # tensors in declared order and their shapes. Hash fields ``k0``, ``k1``, … and ``kshape``,
    # written once at create; ``SAVE`` keeps every ``k`` field, so steps never rewrite them.
    constants: tuple[bytes, ...] = ()
    constant_shapes: tuple[tuple[int, ...], ...] = ()
    expires_in: float | None = None  # filled on reads from PTTL, seconds
    # The write token ``w`` of the write that produced this record (filled on reads, and by
    # ``SessionStore.compare_and_set`` for the records it writes): with ``revision`` it names one
    # write, even after a reset or a delete + re-create brings a revision number back. Not part
    # of a record's equality: two records with the same fields are the same content.
    token: str = field(default="", compare=False)


class WriteOutcome(enum.Enum):
    OK = "ok"
    CONFLICT = "conflict"
    MISSING = "missing"


# What ``SessionStore.load`` gives per key: the record, None (no such key) or the decode error.
Loaded = SessionRecord | SessionCorrupt | None

# Fields the Lua scripts read stay separate (``revision`` for the CAS, ``ttl_s`` for the TTL
# refresh; ``last_reply`` is another key); the rest travel as one JSON ``meta``
# field, because redis-py packs every command argument in Python and a batch write has
# max_batch_size commands: fewer arguments per record is measurably faster (bench/engine.py).
_META = ("session_id", "model", "fingerprint", "step", "owner", "created_at", "updated_at", "last_digest")
_APART = (
    *("revision", "ttl_s", "states", "last_reply", "last_prediction", "constants", "constant_shapes"),
    *("expires_in", "token"),  # from PTTL; field ``w``, written by the scripts
)
assert {*_META, *_APART} == {f.name for f in fields(SessionRecord)}, "every SessionRecord field must be stored"


class _WriteTokens:
    """64 random bits per process, then a counter: unique across processes and replicas like a
    random token, without a ``getrandom`` system call per write (about 5 µs on a VM, once per
    request). A forked child draws its own prefix, so it never repeats its parent's tokens."""

    def __init__(self) -> None:
        self.renew()
        os.register_at_fork(after_in_child=self.renew)

    def renew(self) -> None:
        self.prefix = secrets.token_hex(8)
        self.counter = itertools.count()

    def next(self) -> str:
        return f"{self.prefix}{next(self.counter):x}"


_write_tokens = _WriteTokens()


def new_write_token() -> str:
    """A fresh write token (field ``w``), never drawn before by any process."""
    return _write_tokens.next()


def check(record: SessionRecord) -> None:
    """Refuse a record that must not be written (a non-positive TTL would never expire it)."""
    if record.ttl_s <= 0:
        raise ValueError(f"session {record.session_id!r}: ttl_s must be positive, not {record.ttl_s}")


def encode(record: SessionRecord) -> list[bytes | str]:
    """Flat field/value list for HSET (without the write token ``w``, which the script adds, and
    without the constants, which only ``encode_constants`` writes, once, at create)."""
    meta = orjson.dumps({name: getattr(record, name) for name in _META})
    flat: list[bytes | str] = [
        "revision",
        str(int(record.revision)),
        "ttl_s",
        str(int(record.ttl_s)),
        "meta",
        meta,
    ]
    if record.last_prediction:
        flat += ("p", record.last_prediction)
    for i, state in enumerate(record.states):
        flat += (f"s{i}", bytes(state))
    return flat


def encode_constants(record: SessionRecord) -> list[bytes | str]:
    """The constants' hash fields (``k0``, … and ``kshape``; empty without constants)."""
    if not record.constants:
        return []
    flat: list[bytes | str] = ["kshape", orjson.dumps([list(s) for s in record.constant_shapes])]
    for i, value in enumerate(record.constants):
        flat += (f"k{i}", bytes(value))
    return flat


def decode(key: str, reply: object) -> SessionRecord | SessionCorrupt | None:
    """A ``scripts.LOAD`` reply: None (no key), the record, or ``SessionCorrupt`` (returned, not raised)."""
    if reply is None:
        return None
    if isinstance(reply, bytes):  # the script found another Redis type under the key
        return SessionCorrupt(f"{key} holds a Redis {reply.decode(errors='replace')}, not a session record")
    if not (isinstance(reply, list) and len(reply) in (2, 3)):
        return SessionCorrupt(f"{key}: unexpected reply from the load script: {reply!r:.80}")
    flat, pttl_ms, replay = reply if len(reply) == 3 else (*reply, None)
    try:
        h = dict(zip(flat[::2], flat[1::2], strict=True))
        n = sum(1 for k in h if k[:1] == b"s" and k[1:].isdigit())
        n_constants = sum(1 for k in h if k[:1] == b"k" and k[1:].isdigit())
        shapes = orjson.loads(h[b"kshape"]) if n_constants else []
        meta = orjson.loads(h[b"meta"])
        return SessionRecord(
            session_id=str(meta["session_id"]),
            model=str(meta["model"]),
            fingerprint=str(meta["fingerprint"]),
            step=int(meta["step"]),
            revision=int(h[b"revision"]),
            states=tuple(h[b"s%d" % i] for i in range(n)),  # KeyError on a gap: a state went missing
            owner=str(meta["owner"]),
            created_at=float(meta["created_at"]),
            updated_at=float(meta["updated_at"]),
            ttl_s=int(h[b"ttl_s"]),
            last_digest=str(meta["last_digest"]),
            last_reply=replay if isinstance(replay, bytes) else b"",
            last_prediction=bytes(h.get(b"p", b"")),
            constants=tuple(h[b"k%d" % i] for i in range(n_constants)),
            constant_shapes=tuple(tuple(int(d) for d in shape) for shape in shapes),
            expires_in=int(pttl_ms) / 1000 if int(pttl_ms) >= 0 else None,
            token=bytes(h.get(b"w", b"")).decode(),
        )
    except (KeyError, ValueError, TypeError, orjson.JSONDecodeError) as e:
        return SessionCorrupt(f"{key} does not hold a well-formed session record: {e!r}")
