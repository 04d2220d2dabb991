"""Session operations: the one Python API every transport calls (DESIGN §2–§4).

Steps go through the model's ``Scheduler``; create / reset / import / delete write the store
directly, each write a compare-and-set, so they interleave safely with in-flight steps (a step
that loses the race runs again on the new state).
"""

from __future__ import annotations

import asyncio
import io
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from service.config import Settings
from service.engine.model import RecurrentModel
from service.engine.scheduler import Scheduler, StepReply
from service.engine.tensors import initial_state_bytes, request_digest, states_from_bytes, states_to_bytes
from service.engine.validation import validate_inputs
from service.errors import (
    InvalidInput,
    ModelMismatch,
    ModelNotFound,
    SessionCorrupt,
    SessionExists,
    SessionNotFound,
    StepConflict,
    TooManySessions,
)
from service.metrics import Metrics
from service.store.store import SessionRecord, SessionStore, WriteOutcome

CLIENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._~-]{0,127}$")
META_KEYS = ("carryover_step", "carryover_fingerprint", "carryover_model")
WRITE_ATTEMPTS = 8
COUNT_CACHE_S = 1.0
ROUTING_STRIPES = 256


@dataclass(frozen=True)
class SessionInfo:
    session_id: str
    model: str
    fingerprint: str
    step: int
    expires_in: float
    created_at: float
    updated_at: float


class SessionService:
    def __init__(
        self,
        settings: Settings,
        store: SessionStore,
        models: Mapping[str, RecurrentModel],
        metrics: Metrics | None = None,
    ) -> None:
        if not models:
            raise ValueError("at least one model must be served")
        self.settings = settings
        self.store = store
        self.models = dict(models)
        self.default_model = next(iter(self.models))
        self.schedulers = {name: Scheduler(name, m, store, settings, metrics) for name, m in self.models.items()}
        self.metrics = metrics
        self._session_model: dict[str, str] = {}  # routing cache for multi-model servers
        self._routing_locks = [asyncio.Lock() for _ in range(ROUTING_STRIPES)]
        self._count: tuple[float, int] = (0.0, 0)

    async def start(self) -> None:
        for s in self.schedulers.values():
            s.start()

    async def stop(self) -> None:
        for s in self.schedulers.values():
            await s.stop()

    # -- models -----------------------------------------------------------------------------
    def describe_models(self) -> list[dict[str, Any]]:
        out = []
        for name, m in self.models.items():
            c = m.contract
            entry: dict[str, Any] = {
                "name": name,
                "fingerprint": m.fingerprint,
                "kind": c.kind,
                "form": c.form,
                "provider": m.provider,
                "default": name == self.default_model,
                "inputs": [t.describe() for t in c.inputs],
                "outputs": [t.describe() for t in c.outputs],
                "states": [s.describe() for s in c.states],
            }
            if c.kind == "token_lm":
                vocab = c.vocab or ()
                entry["vocab"] = "".join(vocab) if all(len(v) == 1 for v in vocab) else list(vocab)
                entry["unk_id"] = c.unk_id
            out.append(entry)
        return out

    def model(self, name: str | None) -> RecurrentModel:
        key = name or self.default_model
        if key not in self.models:
            raise ModelNotFound(f"model {key!r} is not served; served models: {sorted(self.models)}")
        return self.models[key]

    # -- lifecycle --------------------------------------------------------------------------
    async def create(
        self,
        *,
        model: str | None = None,
        session_id: str | None = None,
        ttl_s: int | None = None,
        fork_from: str | None = None,
        owner: str = "",
    ) -> SessionInfo:
        ttl = self._ttl(ttl_s)
        if session_id is not None and not CLIENT_ID.match(session_id):
            raise InvalidInput(
                "session_id must be 1-128 characters of A-Z a-z 0-9 . _ ~ - and start with a letter or digit"
            )
        await self._check_capacity()
        now = time.time()
        if fork_from is not None:
            source = await self._load(fork_from, owner)
            if model is not None and model != source.model:
                raise InvalidInput(f"fork_from session uses model {source.model!r}, not {model!r}")
            served_name = source.model
            served = self.model(served_name)
            if source.fingerprint != served.fingerprint:
                raise ModelMismatch(f"session {fork_from!r} holds state of another version of {source.model!r}")
            step, states = source.step, source.states
        else:
            served_name = model or self.default_model
            served = self.model(served_name)
            step, states = 0, initial_state_bytes(served.contract)
        public_id = session_id or secrets.token_urlsafe(16)
        record = SessionRecord(
            session_id=self._key(public_id, owner),
            model=served_name,
            fingerprint=served.fingerprint,
            step=step,
            revision=1,
            states=states,
            owner=owner,
            created_at=now,
            updated_at=now,
            ttl_s=ttl,
        )
        if not await self.store.create(record):
            raise SessionExists(f"session {public_id!r} already exists")
        self._count = (self._count[0], self._count[1] + 1)
        return self._info(public_id, replace(record, expires_in=float(ttl)))

    async def get(self, session_id: str, owner: str = "") -> SessionInfo:
        return self._info(session_id, await self._load(session_id, owner))

    async def delete(self, session_id: str, owner: str = "") -> None:
        if not await self.store.delete(self._key(session_id, owner)):
            raise SessionNotFound(f"session {session_id!r} does not exist or has expired")
        self._session_model.pop(self._key(session_id, owner), None)

    async def reset(self, session_id: str, owner: str = "") -> SessionInfo:
        def zeros(record: SessionRecord) -> SessionRecord:
            return replace(record, step=0, states=initial_state_bytes(self.model(record.model).contract))

        return self._info(session_id, await self._rewrite(session_id, owner, zeros))

    # -- stepping ---------------------------------------------------------------------------
    async def step(
        self, session_id: str, inputs: Mapping[str, Any], expected_step: int | None = None, owner: str = ""
    ) -> StepReply:
        """Apply ``inputs`` (leading T axis) to the session, exactly once (see DESIGN §4)."""
        if expected_step is not None and (not isinstance(expected_step, int) or expected_step < 0):
            raise InvalidInput("'step' must be a non-negative integer")
        key = self._key(session_id, owner)
        if len(self.models) == 1:  # no await before submit: calls queue in the order they were made
            future = self._submit(self.default_model, key, owner, inputs, expected_step)
        else:
            # Finding the session's model may need Redis; a FIFO lock per key stripe keeps the
            # submissions of one session in call order across that await (pipelined WS chunks).
            async with self._routing_locks[hash(key) % len(self._routing_locks)]:
                if key not in self._session_model:
                    self._session_model[key] = (await self._load(session_id, owner)).model
                future = self._submit(self._session_model[key], key, owner, inputs, expected_step)
        reply = await future
        return replace(reply, session_id=session_id)

    def _submit(
        self, name: str, key: str, owner: str, inputs: Mapping[str, Any], expected_step: int | None
    ) -> asyncio.Future[StepReply]:
        """Validate and queue; the scheduler re-checks the session's model on its record."""
        arrays = validate_inputs(self.model(name).contract, inputs, self.settings.max_steps_per_request)
        return self.schedulers[name].submit(key, owner, arrays, expected_step, request_digest(arrays))

    # -- state export / import --------------------------------------------------------------
    async def export_state(self, session_id: str, owner: str = "") -> bytes:
        """``.npz`` with the state tensor names as keys, plus step, fingerprint and model."""
        record = await self._load(session_id, owner)
        model = self.model(record.model)
        states = states_from_bytes(model.contract, record.states)
        buffer = io.BytesIO()
        arrays: dict[str, Any] = {
            **states,
            "carryover_step": np.int64(record.step),
            "carryover_fingerprint": np.str_(record.fingerprint),
            "carryover_model": np.str_(record.model),
        }
        np.savez(buffer, **arrays)
        return buffer.getvalue()

    async def import_state(self, session_id: str, data: bytes, owner: str = "") -> SessionInfo:
        record = await self._load(session_id, owner)
        model = self.model(record.model)
        states, step = parse_state_file(data, model)

        def load_into(current: SessionRecord) -> SessionRecord:
            return replace(current, step=step, states=states_to_bytes(model.contract, states))

        return self._info(session_id, await self._rewrite(session_id, owner, load_into))

    # -- helpers ----------------------------------------------------------------------------
    @staticmethod
    def _key(session_id: str, owner: str) -> str:
        """Store id: sessions are namespaced by owner, so another owner's id is simply absent."""
        return f"{owner}:{session_id}" if owner else session_id

    def _ttl(self, ttl_s: int | None) -> int:
        if ttl_s is None:
            return self.settings.session_ttl_s
        if not isinstance(ttl_s, int) or not 1 <= ttl_s <= 366 * 86400:
            raise InvalidInput("ttl_s must be an integer number of seconds between 1 and 31622400")
        return ttl_s

    async def _check_capacity(self) -> None:
        checked, count = self._count
        if time.monotonic() - checked > COUNT_CACHE_S:
            count = await self.store.count()
            self._count = (time.monotonic(), count)
            if self.metrics:
                self.metrics.sessions.set(count)
        if count >= self.settings.max_sessions:
            raise TooManySessions(f"the server holds its limit of {self.settings.max_sessions} sessions")

    async def _load(self, session_id: str, owner: str) -> SessionRecord:
        (record,) = await self.store.load([self._key(session_id, owner)])
        if isinstance(record, SessionCorrupt):
            raise record
        if record is None or record.owner != owner:
            raise SessionNotFound(f"session {session_id!r} does not exist or has expired")
        return record

    async def _rewrite(
        self, session_id: str, owner: str, change: Callable[[SessionRecord], SessionRecord]
    ) -> SessionRecord:
        """Read, change, compare-and-set; again if a step (or a replica) wrote in between."""
        for _ in range(WRITE_ATTEMPTS):
            current = await self._load(session_id, owner)
            new = replace(
                change(current),
                revision=current.revision + 1,
                updated_at=time.time(),
                last_digest="",
                last_reply=b"",
                expires_in=float(current.ttl_s),
            )
            (outcome,) = await self.store.save([(new, current.revision)])
            if outcome is WriteOutcome.OK:
                return new
            if outcome is WriteOutcome.MISSING:
                raise SessionNotFound(f"session {session_id!r} was deleted")
        raise StepConflict(f"session {session_id!r} kept changing; try again")

    def _info(self, session_id: str, record: SessionRecord) -> SessionInfo:
        return SessionInfo(
            session_id,
            record.model,
            record.fingerprint,
            record.step,
            float(record.expires_in if record.expires_in is not None else record.ttl_s),
            record.created_at,
            record.updated_at,
        )


def parse_state_file(data: bytes, model: RecurrentModel) -> tuple[dict[str, np.ndarray], int]:
    """Validate an uploaded ``.npz``: names, shapes, dtypes, finite values, same model. Never
    unpickles (``allow_pickle=False``)."""
    import zipfile

    c = model.contract
    try:
        archive = np.load(io.BytesIO(data), allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise InvalidInput("the state must be an .npz archive with one array per state tensor")
        arrays = {k: archive[k] for k in archive.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise InvalidInput(f"the state is not a readable .npz archive without pickles: {e}") from None
    names = {s.input for s in c.states}
    for key in arrays:
        if key not in names and key not in META_KEYS:
            raise InvalidInput(f"unknown tensor {key!r} in the state; the model's state tensors are {sorted(names)}")
    fp = arrays.get("carryover_fingerprint")
    if fp is not None and str(fp) != model.fingerprint:
        raise ModelMismatch(
            f"the state was written by a model with fingerprint {str(fp)[:12]}…, this session's "
            f"model is {model.fingerprint[:12]}…"
        )
    states = {}
    for s in c.states:
        if s.input not in arrays:
            raise InvalidInput(f"state tensor {s.input!r} is missing from the archive")
        a = arrays[s.input]
        if a.shape != s.shape:
            raise InvalidInput(f"state tensor {s.input!r} has shape {list(a.shape)}; the model expects {list(s.shape)}")
        if a.dtype != s.dtype:
            raise InvalidInput(f"state tensor {s.input!r} is {a.dtype.name}; the model expects {s.dtype.name}")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise InvalidInput(f"state tensor {s.input!r} contains NaN or Inf")
        states[s.input] = a
    step_value = arrays.get("carryover_step")
    step = 0
    if step_value is not None:
        if step_value.shape != () or step_value.dtype.kind not in "iu" or int(step_value) < 0:
            raise InvalidInput("carryover_step must be a non-negative integer scalar")
        step = int(step_value)
    return states, step
