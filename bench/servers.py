"""The processes a benchmark drives: a private Redis, ``carryover serve`` and the naive baseline.

Each runs as a subprocess on 127.0.0.1 and a free port, in its own process group, and is
stopped with SIGTERM (SIGKILL after a timeout). ``Server`` is a context manager, so an
interrupted benchmark leaves nothing behind.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import httpx

from service.store.embedded import find_redis_server

ROOT = Path(__file__).resolve().parents[1]  # the checkout: ``python -m bench...`` runs from here
START_TIMEOUT_S = 120.0  # a loaded 2-core box can take a while to import ONNX Runtime
SERVERS = ("service", "unbatched", "naive")  # what run_all compares
SERVER_TEXT = {
    "service": "carryover (batching on)",
    "unbatched": "carryover --max-batch-size 1",
    "naive": "naive FastAPI + Redis",
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A subprocess serving ``url``; ``start()`` returns once ``ready`` answers (or raises)."""

    def __init__(
        self, argv: list[str], url: str, ready: str | None = "/readyz", name: str = "server", cwd: Path = ROOT
    ) -> None:
        self.argv, self.url, self.ready, self.name, self.cwd = argv, url, ready, name, cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - the server's output, kept until __exit__

    def start(self) -> Server:
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log, start_new_session=True, cwd=self.cwd
        )
        return self

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> Server:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                break
            if self._answers():
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} did not start ({' '.join(self.argv)}): {self.log_tail()}")

    def _answers(self) -> bool:
        if self.ready is None:  # redis: a TCP connect is enough
            host, port = self.url.removeprefix("redis://").split("/")[0].split(":")
            try:
                socket.create_connection((host, int(port)), timeout=1).close()
                return True
            except OSError:
                return False
        try:
            return httpx.get(self.url + self.ready, timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def log_tail(self, lines: int = 15) -> str:
        self.log.seek(0)
        return "\n".join(self.log.read().decode(errors="replace").splitlines()[-lines:])

    def stop(self, timeout_s: float = 60.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def __enter__(self) -> Server:
        if self.proc is None:
            self.start()
        return self.wait_ready()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
        self.log.close()


def redis(directory: Path, *extra: str) -> Server:
    """A private redis-server without persistence (benchmarks measure the service, not fsync);
    ``extra``: more redis-server flags."""
    port = free_port()
    argv = [find_redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    argv += ["--dir", str(directory), "--daemonize", "no", *extra]
    return Server(argv, f"redis://127.0.0.1:{port}/0", ready=None, name="redis-server")


def carryover(redis_url: str, *extra: str, root: Path = ROOT) -> Server:
    """``carryover serve`` on a free port against ``redis_url`` (``extra``: more serve flags);
    ``root``: the checkout whose ``service`` package runs (another one: an A/B of two versions)."""
    port = free_port()
    argv = [sys.executable, "-m", "service", "serve", "--port", str(port), "--redis-url", redis_url, *extra]
    return Server(argv, f"http://127.0.0.1:{port}", name="carryover serve", cwd=root)


def naive(redis_url: str, *extra: str) -> Server:
    """The naive baseline (``bench/baselines/naive.py``) on a free port against ``redis_url``."""
    port = free_port()
    argv = [sys.executable, "-m", "bench.baselines.naive", "--port", str(port), "--redis-url", redis_url, *extra]
    return Server(argv, f"http://127.0.0.1:{port}", name="naive server")


def by_name(name: str, redis_url: str, max_batch_size: int | None = None) -> Server:
    """One of ``SERVERS``: the service (optionally with ``--max-batch-size``), unbatched, naive."""
    if name == "naive":
        return naive(redis_url)
    if name == "unbatched":
        return carryover(redis_url, "--max-batch-size", "1")
    if name == "service":
        return carryover(redis_url, *(("--max-batch-size", str(max_batch_size)) if max_batch_size else ()))
    raise ValueError(f"unknown server {name!r}; choose from {SERVERS}")
