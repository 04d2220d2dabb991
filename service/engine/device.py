"""The device thread of one model: where its padded batches run, in submission order.

A batch's call is queued in the one thread as soon as the scheduler has admitted and padded
it, behind the call running there, so the thread starts the next call the moment one ends:
waiting for the event loop to hand each call over left the device idle a third of the time at
8 steps per request (docs/decisions.md). ``busy`` counts the calls queued or running, for the
scheduler's "the device is busy, wait for a fuller batch" rule. Calls never share a session
(the scheduler sees to that), so their order changes nothing for any session's state.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from service.engine.batch import PaddedBatch
from service.engine.model import BatchResult, RecurrentModel

Timed = tuple[BatchResult, float]  # a call's result and the seconds the model ran


class DeviceThread:
    def __init__(self, model: RecurrentModel, name: str, on_idle: Callable[[], None]) -> None:
        self.model = model
        self.busy = 0  # calls queued in or running on the thread
        self._on_idle = on_idle  # called when the last queued call is done
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"device-{name}")

    def submit(self, batch: PaddedBatch) -> asyncio.Future[Timed]:
        """Queue ``batch`` behind the calls already there; the future resolves on the loop."""
        call = asyncio.get_running_loop().run_in_executor(self._executor, self.run, batch, False)
        self.busy += 1
        call.add_done_callback(self._done)
        return call

    def run(self, batch: PaddedBatch, tiny: bool) -> Timed:
        """Run one padded batch: in the thread (``submit``), or on the caller's thread for the
        scheduler's tiny inline calls (``tiny``: the model's idle-path session)."""
        started = time.perf_counter()
        result = self.model.run(batch.inputs, batch.mask, batch.states, batch.constants, tiny=tiny)
        return result, time.perf_counter() - started

    def shutdown(self) -> None:
        """Wait for the queued calls, then end the thread."""
        self._executor.shutdown(wait=True)

    def _done(self, call: asyncio.Future[Timed]) -> None:
        if not call.cancelled():
            call.exception()  # retrieved: a batch that failed on an earlier call never awaits it
        self.busy -= 1
        if not self.busy:
            self._on_idle()
