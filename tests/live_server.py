"""A real uvicorn serving a real app on a free 127.0.0.1 port, in a background thread."""

from __future__ import annotations

import contextlib
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI

from service.api.state import app_state
from service.app import create_app
from service.config import Settings
from service.engine.model import RecurrentModel
from service.serve import DrainingServer, uvicorn_config
from tests.redis_fixture import RedisServer, free_port


class LiveServer:
    def __init__(self, app: FastAPI, port: int | None = None) -> None:
        self.app = app
        self.port = port or free_port()
        settings = app_state(app).settings.model_copy(update={"host": "127.0.0.1", "port": self.port})
        self.server = DrainingServer(uvicorn_config(app, settings, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn on port {self.port} did not start")
            time.sleep(0.01)

    def stop(self, timeout_s: float = 60.0) -> None:
        """Like SIGTERM: stop accepting, finish in-flight work, run the lifespan shutdown."""
        self.server.should_exit = True
        self.thread.join(timeout_s)


@contextlib.contextmanager
def live_server(redis_url: str | None, models: Mapping[str, RecurrentModel], **settings: Any) -> Iterator[LiveServer]:
    data_dir = Path(tempfile.mkdtemp(prefix="carryover-api-"))
    app = create_app(Settings(redis_url=redis_url, data_dir=data_dir, **settings), models=models)
    server = LiveServer(app)
    server.start()
    try:
        yield server
    finally:
        server.stop()


API_MODELS = {"gru": "gru_stacked", "tokens": "token_gru", "lstm_step": "lstm_step"}


@pytest.fixture(scope="module")
def api_server(redis_server: RedisServer, loaded: dict[str, RecurrentModel]) -> Iterator[LiveServer]:
    """One server per test module with three models: ``gru`` (default, features [T, 4] → y [T, 3]),
    ``tokens`` (token LM, vocab of 11) and ``lstm_step`` (a step-form LSTM)."""
    models = {name: loaded[key] for name, key in API_MODELS.items()}
    with live_server(
        redis_server.url, models, max_steps_per_request=1000, max_body_bytes=256 * 1024, access_log=True
    ) as server:
        yield server
