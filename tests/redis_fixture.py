"""Real Redis for the tests: a private ``redis-server`` on a free 127.0.0.1 port, no fakes.

``redis_server`` (one per test session) is shared; ``redis_url`` empties it before each test.
Tests that crash, pause or restart Redis start their own ``RedisServer`` so the shared one is
never disturbed.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from service.errors import EmbeddedRedisError
from service.store.embedded import find_redis_server

START_TIMEOUT_S = 60.0  # generous: a loaded 2-core CI box can take a while to exec a process


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """``start()``, ``stop(kill=...)``, ``restart()`` on the same port, ``pause()``/``resume()``."""

    def __init__(
        self, directory: Path, *, port: int | None = None, appendonly: bool = False, extra_args: Sequence[str] = ()
    ) -> None:
        self.directory = Path(directory)
        self.port = port or free_port()
        self.appendonly = appendonly  # with fsync on every write, so data survives kill -9
        self.extra_args = list(extra_args)  # more redis-server options (e.g. cluster mode)
        self.executable = find_redis_server()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=10, retry=Retry(NoBackoff(), 0))

    def start(self) -> None:
        assert self.proc is None, "already running"
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            self.executable,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--daemonize",
            "no",
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--logfile",
            str(self.directory / "redis.log"),
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "always",
            *self.extra_args,
        ]
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        atexit.register(self.stop, kill=True)  # an interrupted run must not leave servers behind
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited ({self.proc.returncode}): {self.log_tail()}")
            try:
                with self.client() as c:
                    c.ping()
                return
            except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
                if time.monotonic() > deadline:
                    self.stop(kill=True)
                    raise RuntimeError(f"redis-server on port {self.port} did not start: {self.log_tail()}") from e
                time.sleep(0.02)

    def stop(self, *, kill: bool = False) -> None:
        """Clean shutdown (SIGTERM), or ``kill=True``: SIGKILL, as in a crash."""
        atexit.unregister(self.stop)
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)  # in case it is paused
            proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        proc.wait(30)

    def restart(self, *, kill: bool = False) -> None:
        self.stop(kill=kill)
        self.start()

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing answers (a hung server)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def log_tail(self) -> str:
        try:
            return "\n".join((self.directory / "redis.log").read_text().splitlines()[-20:])
        except OSError:
            return "(no log)"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    try:
        server = RedisServer(tmp_path_factory.mktemp("redis"))
    except EmbeddedRedisError as e:  # no redis-server anywhere: a broken setup, not a reason to skip
        pytest.fail(str(e))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The shared server's URL, emptied (FLUSHALL) before the test."""
    with redis_server.client() as c:
        c.flushall()
    return redis_server.url
