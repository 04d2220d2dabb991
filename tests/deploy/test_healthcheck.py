"""docker/healthcheck.py (the images' HEALTHCHECK) against a real server's /readyz."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from service.config import BUNDLED_MODEL
from service.engine.model import RecurrentModel
from tests.deploy.files import HEALTHCHECK
from tests.live_server import LiveServer, live_server
from tests.redis_fixture import RedisServer, free_port


@pytest.fixture(scope="module")
def server(redis_server: RedisServer) -> Iterator[LiveServer]:
    with live_server(redis_server.url, {"charlm": RecurrentModel(BUNDLED_MODEL, name="charlm")}) as running:
        yield running


def probe(*args: str, port: int | None = None) -> subprocess.CompletedProcess[str]:
    env = {"CARRYOVER_PORT": str(port)} if port is not None else None
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK), *args], capture_output=True, text=True, timeout=30, env=env
    )


def test_healthy_when_ready(server: LiveServer) -> None:
    assert probe(port=server.port).returncode == 0  # the default URL: 127.0.0.1:$CARRYOVER_PORT/readyz


def test_unhealthy_when_nothing_listens() -> None:
    result = probe(f"http://127.0.0.1:{free_port()}/readyz")
    assert result.returncode == 1 and "not ready" in result.stderr


def test_unhealthy_on_an_error_status(server: LiveServer) -> None:
    result = probe(f"{server.url}/no-such-route")
    assert result.returncode == 1 and "404" in result.stderr
