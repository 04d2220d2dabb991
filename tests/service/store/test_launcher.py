"""RedisProcess, the one redis-server launcher: start, crash, restart, pause, clean stop."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import redis

from service.errors import EmbeddedRedisError
from service.store.launcher import RedisProcess, answers_ping
from tests.redis_fixture import free_port


def tcp_server(directory: Path, port: int) -> RedisProcess:
    directory.mkdir(parents=True, exist_ok=True)
    options = ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory), "--save", ""]
    options += ["--appendonly", "yes", "--appendfsync", "always"]
    return RedisProcess(options, connection={"host": "127.0.0.1", "port": port}, log_path=directory / "redis.log")


def test_start_kill_restart_and_stop(tmp_path: Path) -> None:
    port = free_port()
    server = tcp_server(tmp_path, port)
    server.start()
    try:
        assert server.running and server.pid is not None
        with server.client() as c:
            c.set("kept", "yes")  # fsynced (appendfsync always): it survives the SIGKILL
        with pytest.raises(EmbeddedRedisError, match="already running"):
            server.start()

        server.kill()
        assert not server.running and not answers_ping({"host": "127.0.0.1", "port": port})
        server.start()  # same options: same port, same data
        with server.client() as c:
            assert c.get("kept") == b"yes"

        server.send_signal(signal.SIGSTOP)  # hung: connections open, no answers
        assert not answers_ping({"host": "127.0.0.1", "port": port}, timeout_s=0.2)
        server.send_signal(signal.SIGCONT)
        assert answers_ping({"host": "127.0.0.1", "port": port})

        server.send_signal(signal.SIGSTOP)
        server.stop()  # a paused server is resumed, then shut down cleanly
        assert not server.running
        assert "ready to exit" in server.log_tail(1000)  # a clean shutdown: the AOF fsynced
    finally:
        server.kill()
    server.stop()  # idempotent
    server.kill()


def test_a_server_that_exits_at_start_shows_its_log(tmp_path: Path) -> None:
    server = RedisProcess(
        ["--no-such-option", "x"], connection={"host": "127.0.0.1", "port": free_port()}, log_path=tmp_path / "r.log"
    )
    with pytest.raises(EmbeddedRedisError, match=r"(?s)exited with status .*no-such-option"):
        server.start()
    assert not server.running


def test_sync_client_does_not_retry(tmp_path: Path) -> None:
    server = tcp_server(tmp_path, free_port())  # never started
    with server.client(timeout_s=0.2) as c, pytest.raises(redis.ConnectionError):
        c.ping()
