"""The typed app state: the one idempotent drain, and readiness before the lifespan ran."""

from __future__ import annotations

import asyncio

import pytest
from fastapi import FastAPI

from service.api.problems import CLOSE_RESTART
from service.api.state import AppState, app_state, install_state
from service.config import Settings
from service.errors import NotReady
from service.metrics import Metrics


class Recorder:
    """A stream that finishes as soon as it is drained, or never (``stuck``) until aborted."""

    def __init__(self, stuck: bool = False) -> None:
        self.finished = asyncio.Event()
        self.stuck = stuck
        self.drains: list[tuple[int, str]] = []
        self.aborted = False

    def drain(self, code: int, reason: str) -> None:
        self.drains.append((code, reason))
        if not self.stuck:
            self.finished.set()

    def abort(self) -> None:
        self.aborted = True
        self.finished.set()


def state() -> AppState:
    return AppState(Settings(), Metrics())


async def test_drain_is_idempotent_and_closes_every_stream_with_1012() -> None:
    s = state()
    s.ready = True
    streams = [Recorder(), Recorder()]
    s.streams.update(streams)
    await asyncio.gather(s.drain(), s.drain())
    await s.drain()
    assert (s.ready, s.shutting_down) == (False, True)
    assert all(r.drains == [(CLOSE_RESTART, "server restarting")] for r in streams)


async def test_a_stream_that_does_not_finish_is_aborted_after_the_timeout() -> None:
    s = state()
    quick, stuck = Recorder(), Recorder(stuck=True)
    s.streams.update({quick, stuck})
    await s.close_streams(timeout_s=0.05)
    assert stuck.aborted and not quick.aborted


def test_the_state_is_found_on_the_app_and_sessions_are_not_ready_before_the_lifespan() -> None:
    app = FastAPI()
    with pytest.raises(LookupError):
        app_state(app)
    s = state()
    install_state(app, s)
    assert app_state(app) is s
    with pytest.raises(NotReady):
        s.session_service()
