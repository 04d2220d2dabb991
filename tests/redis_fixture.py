"""Real Redis for the tests: a private ``redis-server`` on a free 127.0.0.1 port, no fakes.

``redis_server`` (one per test session) is shared; ``redis_url`` empties it before each test.
Tests that crash, pause or restart Redis start their own ``RedisServer`` so the shared one is
never disturbed.
"""

from __future__ import annotations

import atexit
import signal
import socket
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import pytest
import redis

from service.errors import EmbeddedRedisError
from service.store.launcher import RedisProcess, find_redis_server
from service.store.store import SessionStore

START_TIMEOUT_S = 60.0  # generous: a loaded 2-core CI box can take a while to exec a process


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """``start()``, ``stop(kill=...)``, ``restart()`` on the same port, ``pause()``/``resume()``.

    A TCP ``RedisProcess`` (the product's launcher) with test options: no RDB, AOF optional.
    """

    def __init__(
        self, directory: Path, *, port: int | None = None, appendonly: bool = False, extra_args: Sequence[str] = ()
    ) -> None:
        self.directory = Path(directory)
        self.port = port or free_port()
        self.appendonly = appendonly  # with fsync on every write, so data survives kill -9
        options = [
            *("--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory), "--save", ""),
            *("--appendonly", "yes" if appendonly else "no", "--appendfsync", "always"),
            *extra_args,  # more redis-server options (e.g. cluster mode)
        ]
        self.process = RedisProcess(
            options,
            connection={"host": "127.0.0.1", "port": self.port},
            log_path=self.directory / "redis.log",
            executable=find_redis_server(),
            start_timeout_s=START_TIMEOUT_S,
        )

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return self.process.client(timeout_s=10)

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process.start()
        atexit.register(self.stop, kill=True)  # an interrupted run must not leave servers behind

    def stop(self, *, kill: bool = False) -> None:
        """Clean shutdown, or ``kill=True``: SIGKILL, as in a crash."""
        atexit.unregister(self.stop)
        if kill:
            self.process.kill()
        else:
            self.process.stop()

    def restart(self, *, kill: bool = False) -> None:
        self.stop(kill=kill)
        self.start()

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing answers (a hung server)."""
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def log_tail(self) -> str:
        return self.process.log_tail()


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


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[SessionStore]:
    """A store on the session's private Redis, closed after the test."""
    s = await SessionStore.connect(redis_url)
    try:
        yield s
    finally:
        await s.close()
