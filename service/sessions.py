"""Session operations: the one contract every transport calls (docs/architecture.md).

HTTP, WebSocket and ``/v2`` are leaves that depend on this module and on nothing below it: it
owns the request and reply types (``StepCall``, ``StepReply``, ``SessionInfo``, ``GenerateCall``
and the generation events), the one parser of a step envelope (``parse_step``) and of a
generation (``parse_generate``), and the one rule for each request field (``step``,
``ttl_s``, session ids, owners). Steps go through the model's ``Scheduler``; create / reset /
import / delete write the store directly, each write a compare-and-set, so they interleave
safely with in-flight steps (a step that loses the race runs again on the new state).
Generations go through the scheduler too, one token per batch (``service.engine.generation``).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from service.config import Settings
from service.engine.cas import rewrite
from service.engine.constants import constant_shapes, constants_to_bytes, validate_constants
from service.engine.contract import ModelContract
from service.engine.generation import (
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    DoneEvent,
    GenerateCall,
    GenerationStream,
    TokenEvent,
    new_generation,
    parse_generate,
)
from service.engine.model import RecurrentModel
from service.engine.scheduler import Scheduler, StepReply
from service.engine.tensors import initial_state_bytes, request_digest, states_to_bytes
from service.engine.validation import integral, validate_inputs
from service.errors import (
    InvalidInput,
    ModelMismatch,
    ModelNotFound,
    RateLimited,
    SessionCorrupt,
    SessionExists,
    SessionNotFound,
    Unavailable,
)
from service.metrics import Metrics
from service.session_rules import MAX_TTL_S, SESSION_ID, SESSION_ID_RULE, checked_step, checked_ttl, is_session_id
from service.state_file import read_state_file, write_state_file
from service.store.store import SessionRecord, SessionStore

__all__ = [
    "MAX_STOP_CHARS",
    "MAX_STOP_STRINGS",
    "MAX_TTL_S",
    "SESSION_ID",
    "DoneEvent",
    "GenerateCall",
    "GenerationStream",
    "ModelContract",
    "SessionInfo",
    "SessionService",
    "StepCall",
    "StepReply",
    "TokenEvent",
    "checked_step",
    "integral",
    "is_session_id",
    "parse_generate",
    "parse_step",
]

STEP_FIELDS = frozenset({"inputs", "step"})
_T = TypeVar("_T")
ROUTING_STRIPES = 256


@dataclass(frozen=True)
class StepCall:
    """One step as every transport hands it over: ``inputs`` with a leading T axis (checked
    against the model when submitted) and ``expected_step`` for exactly-once (``None``: apply in
    arrival order). Built valid or not at all."""

    inputs: Mapping[str, Any]
    expected_step: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "expected_step", checked_step(self.expected_step))


def parse_step(body: object, *, transport_fields: frozenset[str] = frozenset()) -> StepCall:
    """THE parser of a step envelope: a decoded JSON object ``{"inputs": {...}, "step": n?}`` →
    ``StepCall``. ``transport_fields`` are keys a transport reads itself (the WebSocket's ``id``)
    and are ignored here; any other unknown key is an error."""
    if not isinstance(body, dict):
        raise InvalidInput('a step must be a JSON object: {"inputs": {"<name>": [...]}, "step": n?}')
    unknown = sorted(set(body) - STEP_FIELDS - transport_fields)
    if unknown:
        allowed = ", ".join(repr(f) for f in sorted(STEP_FIELDS | transport_fields))
        raise InvalidInput(f"unknown field(s) {unknown}; a step takes {allowed} ('inputs' required)")
    if "inputs" not in body:
        raise InvalidInput("missing field 'inputs'")
    inputs = body["inputs"]
    if not isinstance(inputs, dict):
        raise InvalidInput("'inputs' must be an object mapping each input name to an array with a leading T axis")
    return StepCall(inputs, body.get("step"))


# -- the reply types ---------------------------------------------------------------------------
@dataclass(frozen=True)
class SessionInfo:
    """A session's metadata, as every transport reports it."""

    session_id: str
    model: str
    fingerprint: str
    step: int
    expires_in: float
    created_at: float
    updated_at: float
    constants: dict[str, list[int]] = field(default_factory=dict)  # name -> shape, for models with constants


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

    async def start(self) -> None:
        for s in self.schedulers.values():
            s.start()

    async def stop(self) -> None:
        for s in self.schedulers.values():
            await s.stop()

    # -- models -----------------------------------------------------------------------------
    def describe_models(self) -> list[dict[str, Any]]:
        return [m.describe(name, default=name == self.default_model) for name, m in self.models.items()]

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
        derived: bool = False,  # a transport's own id: ``~`` + the rule (``service.sequences``)
        constants: object = None,  # the model's per-session constants, e.g. {"memory": [[...], ...]}
    ) -> SessionInfo:
        ttl = checked_ttl(ttl_s, self.settings.session_ttl_s)
        if session_id is not None and not is_session_id(session_id[1:] if derived else session_id):
            raise InvalidInput(f"session_id must be {SESSION_ID_RULE}")
        now = time.time()
        if fork_from is not None:
            source = await self._load(fork_from, owner)
            if model is not None and model != source.model:
                raise InvalidInput(f"fork_from session uses model {source.model!r}, not {model!r}")
            served_name = source.model
            served = self.model(served_name)
            if source.fingerprint != served.fingerprint:
                raise ModelMismatch(f"session {fork_from!r} holds state of another version of {source.model!r}")
            if constants is not None:
                raise InvalidInput("a fork keeps its source's constants; 'constants' cannot be given with 'fork_from'")
            step, states, kept = source.step, source.states, (source.constants, source.constant_shapes)
        else:
            served_name = model or self.default_model
            served = self.model(served_name)
            arrays = validate_constants(served.contract, constants, self.settings.max_constant_bytes)
            step, states, kept = 0, initial_state_bytes(served.contract), constants_to_bytes(served.contract, arrays)
        public_id = session_id or new_session_id()
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
            constants=kept[0],
            constant_shapes=kept[1],
        )
        # The store counts the session and enforces both session limits in Redis (every replica's).
        limits = {"max_sessions": self.settings.max_sessions, "max_per_owner": self.settings.max_sessions_per_key}
        if not await self.store.create(record, **limits):
            raise SessionExists(f"session {public_id!r} already exists")
        return self._info(public_id, replace(record, expires_in=float(ttl)))

    async def get(self, session_id: str, owner: str = "") -> SessionInfo:
        return self._info(session_id, await self._load(session_id, owner))

    async def delete(self, session_id: str, owner: str = "") -> None:
        if not await self.store.delete(self._key(session_id, owner), owner):
            raise _not_found(session_id)
        self._session_model.pop(self._key(session_id, owner), None)

    async def reset(self, session_id: str, owner: str = "") -> SessionInfo:
        def zeros(record: SessionRecord) -> SessionRecord:
            return replace(record, step=0, states=initial_state_bytes(self.model(record.model).contract))

        return self._info(session_id, await self._rewrite(session_id, owner, zeros))

    # -- stepping ---------------------------------------------------------------------------
    async def step(
        self, session_id: str, inputs: Mapping[str, Any], expected_step: int | None = None, owner: str = ""
    ) -> StepReply:
        """Apply ``inputs`` (leading T axis) to the session, exactly once (see docs/architecture.md)."""
        return await self.apply(session_id, StepCall(inputs, expected_step), owner)

    async def apply(self, session_id: str, call: StepCall, owner: str = "") -> StepReply:
        """Run one parsed step (what the transports call with ``parse_step``'s result).

        Sessions only *route* a step to its model's scheduler; whether the session exists, is
        ``owner``'s and holds that model's state is checked once, by the scheduler, on the
        record it reads for the batch (the read that the write's compare-and-set is based on,
        so no check here could be fresher)."""
        key = self._key(session_id, owner)
        reply = await (await self._routed(key, session_id, lambda name: self._submit(name, key, owner, call)))
        return reply if reply.session_id == session_id else replace(reply, session_id=session_id)

    def apply_nowait(self, session_id: str, call: StepCall, owner: str = "") -> asyncio.Future[StepReply] | None:
        """``apply``'s submission, without a task, where routing needs no Redis (one model): the
        scheduler's own future, whose reply names the stored key rather than ``session_id``.
        None with several models: use ``apply``. Raises what ``apply`` raises before queueing."""
        if len(self.models) != 1:
            return None
        return self._submit(self.default_model, self._key(session_id, owner), owner, call)

    async def generate(self, session_id: str, call: GenerateCall, owner: str = "") -> GenerationStream:
        """Start a generation (token LMs; docs/generation.md): ``TokenEvent``s, then a ``DoneEvent``.
        What fails before the first token (404, 409 on ``step``) is raised by the first ``__anext__``."""
        checked_step(call.expected_step)
        key = self._key(session_id, owner)

        def submit(name: str) -> GenerationStream:
            g = new_generation(self.model(name).contract, call, self.settings)
            future = self.schedulers[name].submit(key, owner, {g.input.name: g.prompt}, call.expected_step, g.digest, g)
            return GenerationStream(g, future)

        return await self._routed(key, session_id, submit)

    async def _routed(self, key: str, session_id: str, submit: Callable[[str], _T]) -> _T:
        """``submit`` to the session's model. One model: no await before it, so calls queue in
        the order they were made. Several: finding the session's model may need Redis; a FIFO
        lock per key stripe keeps one session's submissions in call order across that await."""
        if len(self.models) == 1:
            return submit(self.default_model)
        async with self._routing_locks[hash(key) % len(self._routing_locks)]:
            if key not in self._session_model:
                self._session_model[key] = await self._model_of(key, session_id)
            return submit(self._session_model[key])

    def _submit(self, name: str, key: str, owner: str, call: StepCall) -> asyncio.Future[StepReply]:
        arrays = validate_inputs(self.model(name).contract, call.inputs, self.settings.max_steps_per_request)
        # Only a request with `step` can be replayed, so only it needs the digest.
        digest = request_digest(arrays) if call.expected_step is not None else ""
        return self.schedulers[name].submit(key, owner, arrays, call.expected_step, digest)

    async def _model_of(self, key: str, session_id: str) -> str:
        """Routing only (see ``apply``): the model named in the session's record."""
        (record,) = await self.store.load([key])
        if isinstance(record, SessionCorrupt):
            raise record
        if record is None:
            raise _not_found(session_id)
        return record.model

    # -- access -----------------------------------------------------------------------------
    async def admit(self, owner: str) -> None:
        """One request of ``owner`` against its rate limit (``rate_limit_rps``, a token bucket in
        Redis shared by every replica): ``RateLimited`` with the wait when it is used up."""
        rate = self.settings.rate_limit_rps
        if rate <= 0:
            return
        wait = await self.store.take_token(owner, rate, self.settings.rate_limit_burst)
        if wait > 0:
            raise RateLimited(f"this API key's limit of {rate:g} requests per second is reached", retry_after=wait)

    async def count(self, owner: str = "") -> tuple[int, int]:
        """Live sessions ``(of the store, of owner)``, O(1) (see ``service.store.counting``);
        also sets the sessions gauge."""
        tally = await self.store.count_sessions(owner)
        if self.metrics:
            self.metrics.sessions.set(tally.total)
        return tally.total, tally.owned

    # -- readiness --------------------------------------------------------------------------
    async def ping(self) -> None:
        """Readiness: the store answers within ``redis_timeout_s``, else ``Unavailable``."""
        try:
            async with asyncio.timeout(self.settings.redis_timeout_s):
                await self.store.ping()
        except Exception as e:  # any failure to answer means: not ready
            raise Unavailable(f"the session store does not answer: {type(e).__name__}: {e}") from None

    # -- state export / import --------------------------------------------------------------
    async def export_state(self, session_id: str, owner: str = "") -> bytes:
        """``.npz`` with the state tensor names as keys, plus step, fingerprint and model."""
        record = await self._load(session_id, owner)
        return write_state_file(self.model(record.model), record)

    async def import_state(self, session_id: str, data: bytes, owner: str = "") -> SessionInfo:
        record = await self._load(session_id, owner)
        model = self.model(record.model)
        states, step = read_state_file(data, model)

        def load_into(current: SessionRecord) -> SessionRecord:
            return replace(current, step=step, states=states_to_bytes(model.contract, states))

        return self._info(session_id, await self._rewrite(session_id, owner, load_into))

    # -- helpers ----------------------------------------------------------------------------
    @staticmethod
    def _key(session_id: str, owner: str) -> str:
        """Store id: sessions are namespaced by owner, so another owner's id is simply absent; so
        is an id that breaks the session id rule (``~`` + the rule: a transport's derived id)."""
        if not is_session_id(session_id.removeprefix("~")):
            raise _not_found(session_id)
        return f"{owner}:{session_id}" if owner else session_id

    async def _load(self, session_id: str, owner: str) -> SessionRecord:
        (record,) = await self.store.load([self._key(session_id, owner)])
        if isinstance(record, SessionCorrupt):
            raise record
        if record is None or record.owner != owner:  # the owner rule of every non-step path
            raise _not_found(session_id)
        return record

    async def _rewrite(
        self, session_id: str, owner: str, change: Callable[[SessionRecord], SessionRecord]
    ) -> SessionRecord:
        """Read, change, compare-and-set; again if a step (or a replica) wrote in between."""
        return await rewrite(self.store, self._key(session_id, owner), owner, change, session_id=session_id)

    def _info(self, session_id: str, record: SessionRecord) -> SessionInfo:
        return SessionInfo(
            session_id,
            record.model,
            record.fingerprint,
            record.step,
            float(record.expires_in if record.expires_in is not None else record.ttl_s),
            record.created_at,
            record.updated_at,
            constant_shapes(served.contract if (served := self.models.get(record.model)) else None, record),
        )


def new_session_id() -> str:
    """128 random bits, URL-safe (22 characters), drawn again in the 1 in 32 cases where the
    first character is ``-`` or ``_``, so generated ids follow the session id rule too."""
    while not is_session_id(candidate := secrets.token_urlsafe(16)):
        pass
    return candidate


def _not_found(session_id: str) -> SessionNotFound:
    return SessionNotFound(f"session {session_id!r:.140} does not exist or has expired")
