"""The ragged micro-batcher (docs/architecture.md): one per model per process.

It decides *what* runs (the policy): ``admission.py`` judges each loaded record, ``batch.py``
pads the chosen rows into one batch, ``RecurrentModel`` runs it, ``SessionStore`` keeps the state.

* Requests wait in one arrival-ordered queue (bounded: ``Overloaded`` when full).
* A batch takes, in arrival order, the first waiting request of each session not in flight, up
  to ``max_batch_size`` rows and ``max_batch_tokens`` timesteps; it waits up to ``max_wait_us``
  for more only while the device is busy.
* Long requests run in ``max_chunk`` chunks in consecutive batches, their intermediate state in
  memory; only the last chunk writes, so a request is applied whole or not at all.
* Pipelining: while batch k runs in the device thread, batch k+1 is gathered, its states
  loaded (one round trip; none for sessions whose record this process last wrote, ``reads``),
  padded on the loop and queued in the device thread behind k, which starts it the moment k
  ends; batch k-1's write (one round trip, CAS per session) overlaps both.
  A tiny batch (``inline_max_cells``) with nothing else queued runs on the event loop instead.
* Generations (continuous batching, ``generation.py``): a generation's row re-enters the queue
  at its back after every iteration with its next token as input, its state in memory and its
  base the record it just wrote; its session's other requests wait until it ends. Every batch
  writes its generations' iterations, then samples their next tokens in one vectorised call.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import time

import numpy as np

from service.config import Settings
from service.engine.admission import admission, replay_copy, written_record
from service.engine.batch import StepReply, StepRequest, join_chunks, pad_rows, split_chunks, unpad_rows
from service.engine.buckets import padding_ratio, plan_buckets
from service.engine.cas import MAX_ATTEMPTS
from service.engine.device import DeviceThread, Timed
from service.engine.generation import Generation, advance, first_inputs
from service.engine.model import RecurrentModel
from service.engine.reads import fetch_bases, fetch_replay
from service.engine.record_cache import RecordCache
from service.engine.tensors import session_tensors
from service.errors import (
    CarryoverError,
    Overloaded,
    SessionCorrupt,
    SessionNotFound,
    ShuttingDown,
    StepConflict,
    StoreUnavailable,
)
from service.metrics import Metrics
from service.store.store import SessionRecord, SessionStore, WriteOutcome

log = logging.getLogger(__name__)
__all__ = ["Scheduler", "StepReply", "StepRequest"]
# Batches between gather and write: one writing, one on the device, one queued behind it.
PIPELINE_DEPTH = 3


class Scheduler:
    def __init__(
        self, name: str, model: RecurrentModel, store: SessionStore, settings: Settings, metrics: Metrics | None = None
    ) -> None:
        self.name = name  # the served name, recorded in every session of this model
        self.model = model
        self.store = store
        self.settings = settings
        self.metrics = metrics.for_model(name) if metrics else None
        self._queue: dict[int, StepRequest] = {}  # arrival order
        self._arrivals = itertools.count()
        self._in_flight: set[str] = set()
        self._generating: dict[str, StepRequest] = {}  # session -> its running generation's row
        self._changed = asyncio.Event()
        self._slots = asyncio.Semaphore(PIPELINE_DEPTH)
        # Queue and thread of the model's calls; its last call ending wakes a gatherer that waits
        # for a fuller batch only while the device is busy.
        self.device = DeviceThread(model, name, on_idle=self._changed.set)
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = False
        self.cache = RecordCache(settings.record_cache_sessions)
        self.batches = 0  # counters for benchmarks and tests
        self.loads = 0  # records loaded for admission (the record cache's misses)
        self.model_calls = 0
        self.call_shapes: collections.deque[tuple[int, int]] = collections.deque(maxlen=100_000)  # (B, T)
        self.generation_rows: collections.deque[int] = collections.deque(maxlen=100_000)  # per batch

    # -- public -----------------------------------------------------------------------------
    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._run(), name=f"scheduler-{self.name}")

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Stop accepting; finish what is queued and in flight (their writes included); running
        generations stop at their next token boundary (``cancelled``)."""
        self._stopping = True
        for r in self._queue.values():  # generations end at their next token boundary
            if r.generation is not None:
                r.generation.cancel()
        self._changed.set()
        if self._loop_task is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._loop_task), timeout_s)
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        for r in list(self._queue.values()):
            self._fail(r, ShuttingDown("the server is shutting down"))
        self.device.shutdown()

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def submit(
        self,
        session_id: str,
        owner: str,
        inputs: dict[str, np.ndarray],
        expected_step: int | None,
        digest: str,
        generation: Generation | None = None,
    ) -> asyncio.Future[StepReply]:
        """Queue a validated request; the future resolves after its write succeeded (for a
        ``generation``, after its last iteration: its tokens arrive on ``generation.events``)."""
        if self._stopping:
            raise ShuttingDown("the server is shutting down", retry_after=1)
        if len(self._queue) >= self.settings.max_queue:
            raise Overloaded(f"{len(self._queue)} requests are queued for model {self.name!r}", retry_after=1)
        future: asyncio.Future[StepReply] = asyncio.get_running_loop().create_future()
        chunks = split_chunks(inputs, self.settings.max_chunk)
        request = StepRequest(session_id, owner, chunks, expected_step, digest, future, generation=generation)
        if generation is not None:
            generation.prompt_chunks = chunks
        request.arrival = next(self._arrivals)
        self._queue[request.arrival] = request
        self._gauge()
        self._changed.set()
        return future

    # -- gathering --------------------------------------------------------------------------
    def _eligible(self) -> list[StepRequest]:
        rows: list[StepRequest] = []
        tokens = 0
        seen: set[str] = set()
        for key, r in list(self._queue.items()):
            if r.future.done():  # the client went away: nothing of it was written, drop it
                del self._queue[key]
                continue
            if self._generating.get(r.session_id, r) is not r:
                continue  # the session's generation goes first, however often it re-enters the queue
            if r.session_id in seen or r.session_id in self._in_flight:
                seen.add(r.session_id)  # a session's later requests wait for its earlier ones
                continue
            seen.add(r.session_id)
            if rows and tokens + r.chunk_steps > self.settings.max_batch_tokens:
                continue
            rows.append(r)
            tokens += r.chunk_steps
            if len(rows) >= self.settings.max_batch_size:
                break
        return rows

    def _full(self, rows: list[StepRequest]) -> bool:
        return (
            len(rows) >= self.settings.max_batch_size
            or sum(r.chunk_steps for r in rows) >= self.settings.max_batch_tokens
        )

    async def _gather(self) -> list[StepRequest] | None:
        while True:
            self._changed.clear()
            rows = self._eligible()
            if rows and self.device.busy and not self._full(rows) and self.settings.max_wait_us > 0:
                # The device is busy anyway: a short wait lets more work join this batch.
                deadline = time.monotonic() + self.settings.max_wait_us / 1e6
                while self.device.busy and not self._full(rows) and (left := deadline - time.monotonic()) > 0:
                    self._changed.clear()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), left)
                    rows = self._eligible()
            if rows:
                self._in_flight.update(r.session_id for r in rows)
                self._generating.update((r.session_id, r) for r in rows if r.generation is not None)
                return rows
            if self._stopping and not self._queue and all(t.done() for t in self._tasks):
                return None
            await self._changed.wait()

    async def _run(self) -> None:
        while True:
            await self._slots.acquire()
            batch = await self._gather()
            if batch is None:
                self._slots.release()
                return
            task = asyncio.create_task(self._process(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    # -- one batch --------------------------------------------------------------------------
    async def _process(self, batch: list[StepRequest]) -> None:
        try:
            runnable = [r for r in batch if r.base is not None] + await self._admit(
                [r for r in batch if r.base is None]
            )
            runnable = [r for r in runnable if not self._cancelled(r)]
            self.generation_rows.append(sum(r.generation is not None for r in runnable))
            if runnable:
                await self._run_model(runnable)
            finals = [r for r in runnable if not r.future.done() and r.next_chunk == len(r.chunks)]
            if finals:
                self._advance(await self._write(finals))
        except Exception as e:  # a bug or a model failure: fail this batch, keep serving
            log.exception("batch failed")
            for r in batch:
                self._fail(r, CarryoverError(f"internal error while running the batch: {type(e).__name__}"))
        finally:
            for r in batch:
                self._in_flight.discard(r.session_id)
                if r.future.done():
                    self._forget(r)
            self.batches += 1
            self._gauge()
            self._slots.release()
            if self._queue or self._stopping:  # an idle server's gatherer sleeps on until the next submit
                self._changed.set()

    async def _admit(self, fresh: list[StepRequest]) -> list[StepRequest]:
        """Load the batch's records in one round trip (those the record cache admits need none);
        decide apply / replay / conflict."""
        if not fresh:
            return []
        started = time.perf_counter()
        if self.metrics:
            for r in fresh:
                self.metrics.queue_wait.observe(started - r.queued_at)
        try:
            records, loads = await fetch_bases(self.store, self.cache, fresh, self.name, self.model.fingerprint)
        except StoreUnavailable as e:
            for r in fresh:
                self._fail(r, e)
            return []
        if loads:
            self.loads += loads
            if self.metrics:
                self.metrics.redis_load.observe(time.perf_counter() - started)
        admitted = []
        for r, rec in zip(fresh, records, strict=True):
            verdict = admission(r, rec, self.name, self.model.fingerprint)
            if isinstance(verdict, CarryoverError):
                self._fail(r, verdict)
            elif verdict == "replay":
                reply = await fetch_replay(self.store, r)
                if isinstance(reply, CarryoverError):
                    self._fail(r, reply)
                else:
                    self._resolve(r, reply)
            else:
                assert isinstance(rec, SessionRecord)
                try:
                    r.states, r.constants = session_tensors(self.model.contract, rec)
                except ValueError as e:  # a truncated or missing state (or constant) tensor
                    self._fail(r, SessionCorrupt(f"session {r.session_id!r}: {e}"))
                    continue
                r.base = rec
                admitted.append(r)
        return self._first_tokens(admitted)

    def _first_tokens(self, admitted: list[StepRequest]) -> list[StepRequest]:
        """Generations with an empty prompt start from the session's stored last prediction."""
        starting = [r for r in admitted if r.generation is not None and not r.chunks]
        replies = [r.base.last_prediction if r.base else b"" for r in starting]
        for r, first in zip(starting, first_inputs([r.generation for r in starting], replies), strict=True):
            if isinstance(first, CarryoverError):
                self._fail(r, first)
            else:
                r.chunks = [first]
        return [r for r in admitted if not r.future.done()]

    async def _run_model(self, rows: list[StepRequest]) -> None:
        lengths = [r.chunk_steps for r in rows]
        groups = [[rows[i] for i in g] for g in plan_buckets(lengths, self.settings.bucket_overhead_tokens)]
        group_steps = [[r.chunk_steps for r in members] for members in groups]
        calls: list[asyncio.Future[Timed] | Timed] = []
        for members, steps in zip(groups, group_steps, strict=True):
            cells = len(steps) * max(steps)
            if not self.device.busy and len(self._queue) <= len(rows) and cells <= self.settings.inline_max_cells:
                # Nothing else waits and the call is tiny: the hop to the device thread and
                # back (two context switches) would cost more than the loop is blocked.
                calls.append(self.device.run(pad_rows(self.model.contract, members), tiny=True))
            else:  # padded here: in the device thread it waited for the GIL behind the busy loop
                calls.append(self.device.submit(pad_rows(self.model.contract, members)))
        for members, steps, call in zip(groups, group_steps, calls, strict=True):
            result, seconds = await call if isinstance(call, asyncio.Future) else call
            self.model_calls += 1
            self.call_shapes.append((len(members), max(steps)))
            if self.metrics:
                self.metrics.model_call(seconds, len(steps), padding_ratio(steps))
            for r, row in zip(members, unpad_rows(result, steps), strict=True):
                r.outputs.append(row.outputs)
                r.states = row.states
                r.next_chunk += 1

    async def _write(self, finals: list[StepRequest]) -> list[StepRequest]:
        """One pipelined round trip; each session's write is a CAS on the revision and write token
        it was read at. Returns the generations whose iteration landed (their base is now the
        written record); every landed record is cached, every lost one evicted."""
        now = time.time()
        writes = []
        replies = []
        for r in finals:
            assert r.base is not None
            outputs = join_chunks(r.outputs)
            record = written_record(r, r.base, self.model.contract, outputs, now)
            replay = replay_copy(r, outputs, self.settings.replay_max_bytes)
            writes.append((record, r.base.revision, r.base.token, replay))
            replies.append(StepReply(r.session_id, record.step, outputs))
        try:
            started = time.perf_counter()
            outcomes = await self.store.compare_and_set(writes, replay_window_s=self.settings.replay_window_s)
            if self.metrics:
                self.metrics.redis_save.observe(time.perf_counter() - started)
        except StoreUnavailable as e:
            for r in finals:  # the write may or may not have landed: a retry with `step` tells
                self.cache.evict(r.session_id)
                self._fail(r, e)
            return []
        landed = []
        for r, reply, (outcome, written) in zip(finals, replies, outcomes, strict=True):
            if outcome is WriteOutcome.OK:
                self.cache.put(written)
                if self.metrics:
                    self.metrics.steps.inc(r.total_steps)
                if r.generation is None:
                    self._resolve(r, reply)
                else:
                    r.base, r.cached = written, False
                    landed.append(r)
                continue
            self.cache.evict(r.session_id, stale=r.cached and outcome is WriteOutcome.CONFLICT)
            if outcome is WriteOutcome.MISSING and not r.cached:
                self._fail(r, SessionNotFound(f"session {r.session_id!r} was deleted"))
            elif r.generation is not None and r.generation.started:  # tokens were streamed: no rerun
                self._fail(r, StepConflict(f"session {r.session_id!r} was changed by another writer mid-generation"))
            elif r.attempts + 1 >= MAX_ATTEMPTS:
                self._fail(r, StepConflict(f"session {r.session_id!r} kept changing under this request"))
            else:  # another writer won the CAS (or the cache was stale): run again from Redis's record
                if self.metrics:
                    self.metrics.cas_conflicts.inc()
                r.restart()
        return landed

    # -- generations ------------------------------------------------------------------------
    def _advance(self, landed: list[StepRequest]) -> None:
        """Stream what each generation's iteration applied; those that go on get their next token
        (sampled in one vectorised call) and queue again, at the back."""
        steps = [r.base.step if r.base else 0 for r in landed]
        nexts = advance([r.generation for r in landed], steps, [r.outputs[-1] for r in landed])
        for r, step, chunk in zip(landed, steps, nexts, strict=True):
            if chunk is None:
                self._resolve(r, StepReply(r.session_id, step, {}))
                continue
            r.chunks, r.next_chunk, r.outputs = [chunk], 0, []
            self._queue.pop(r.arrival, None)
            r.arrival = next(self._arrivals)
            self._queue[r.arrival] = r

    def _cancelled(self, r: StepRequest) -> bool:
        """A generation cancelled between iterations ends here, at its last token boundary."""
        if r.generation is None or not r.generation.cancelled or r.base is None:
            return False
        r.generation.finish("cancelled", r.base.step)
        self._resolve(r, StepReply(r.session_id, r.base.step, {}))
        return True

    # -- helpers ----------------------------------------------------------------------------
    def _resolve(self, r: StepRequest, reply: StepReply) -> None:
        if not r.future.done():
            r.future.set_result(reply)
        self._forget(r)

    def _fail(self, r: StepRequest, error: CarryoverError) -> None:
        if not r.future.done():
            r.future.set_exception(error)
        self._forget(r)

    def _forget(self, r: StepRequest) -> None:
        self._queue.pop(r.arrival, None)
        if self._generating.get(r.session_id) is r:
            del self._generating[r.session_id]

    def _gauge(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.set(len(self._queue))
