"""EmbeddedRedis: a private redis-server under a data directory (docs/contract.md §2), and the
composition helper ``redis_or_embedded``."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from service.errors import EmbeddedRedisError
from service.store import embedded as er
from service.store.embedded import EmbeddedRedis, redis_or_embedded
from service.store.record import SessionRecord, WriteOutcome
from service.store.store import SessionStore
from tests.service.store.test_store import REPO, advanced, consistent_states, gone, record

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_embedded_redis_persists_across_restarts(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    e = EmbeddedRedis(data_dir)
    await asyncio.to_thread(e.start)
    assert e.url == f"unix://{data_dir / 'redis.sock'}"
    pid = e.pid
    assert pid is not None
    s = await SessionStore.connect(e.url)
    rec = record("persist")
    await s.create(rec)
    assert await s.save([(advanced(rec), 1)]) == [WriteOutcome.OK]
    await s.close()
    assert e.running  # the store starts and stops no process
    await asyncio.to_thread(e.stop)
    assert gone(pid) and not e.running
    assert not (data_dir / "redis.sock").exists()

    async with redis_or_embedded(None, data_dir) as url:
        s = await SessionStore.connect(url)
        try:
            [got] = await s.load(["persist"], with_reply=True)
            assert isinstance(got, SessionRecord) and got.revision == 2 and got.states == consistent_states(2)
        finally:
            await s.close()
    assert not (data_dir / "redis.sock").exists()  # stopped on exit


async def test_a_redis_url_is_used_as_given(redis_url: str, tmp_path: Path) -> None:
    async with redis_or_embedded(redis_url, tmp_path) as url:
        assert url == redis_url
    assert not any(tmp_path.iterdir())  # nothing started, nothing written


async def test_embedded_redis_with_a_long_data_dir(tmp_path: Path) -> None:
    data_dir = tmp_path.joinpath(*["a-rather-long-directory-name"] * 5)
    assert len(str(data_dir / "redis.sock")) > 108
    e = EmbeddedRedis(data_dir)
    await asyncio.to_thread(e.start)
    socket_path = e.socket_path
    assert len(socket_path) <= er.MAX_SOCKET_PATH
    s = await SessionStore.connect(e.url)
    await s.create(record("long"))
    assert await s.count() == 1
    await s.close()
    await asyncio.to_thread(e.stop)
    assert not os.path.exists(os.path.dirname(socket_path))  # the private socket dir is removed
    assert (data_dir / "appendonlydir").is_dir() or (data_dir / "appendonly.aof").is_file()


async def test_embedded_redis_refuses_a_data_dir_in_use(tmp_path: Path) -> None:
    first = EmbeddedRedis(tmp_path)
    await asyncio.to_thread(first.start)
    try:
        with pytest.raises(EmbeddedRedisError, match="in use"):
            await asyncio.to_thread(EmbeddedRedis(tmp_path).start)
        assert first.running
        with redis.Redis(unix_socket_path=first.socket_path) as c:
            assert c.ping()
    finally:
        first.stop()
    assert not first.running


async def test_embedded_redis_stops_an_orphan_of_a_dead_service(tmp_path: Path) -> None:
    """A service killed hard leaves its redis-server running; the next start shuts it down
    cleanly (its data kept) instead of running two servers on one AOF."""
    code = (
        "import os, sys, redis; from pathlib import Path;"
        "from service.store.embedded import EmbeddedRedis;"
        "e = EmbeddedRedis(Path(sys.argv[1])); e.start();"
        "redis.Redis(unix_socket_path=e.socket_path).set('left', 'behind');"
        "print(e.pid, flush=True); os._exit(0)"
    )
    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", code, str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    orphan = int(out.stdout.strip())
    assert not gone(orphan)
    e = EmbeddedRedis(tmp_path)
    await asyncio.to_thread(e.start)
    try:
        assert gone(orphan)
        with redis.Redis(unix_socket_path=e.socket_path) as c:
            assert c.get("left") == b"behind"
    finally:
        e.stop()


async def test_embedded_redis_start_failure_shows_the_log(tmp_path: Path) -> None:
    fake = tmp_path / "redis-server"
    fake.write_text("#!/bin/sh\necho 'FATAL: something is wrong with the config' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(EmbeddedRedisError, match="something is wrong"):
        await asyncio.to_thread(EmbeddedRedis(tmp_path / "d", executable=str(fake)).start)
    # The lock was released: a real start on the same directory works.
    e = EmbeddedRedis(tmp_path / "d")
    await asyncio.to_thread(e.start)
    e.stop()


async def test_no_redis_server_anywhere_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EmbeddedRedisError, match=r"install redis-server .* or set a Redis URL"):
        er.find_redis_server()


async def test_embedded_redis_refuses_a_newer_aof_with_an_old_binary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "appendonlydir").mkdir()
    monkeypatch.setattr(er, "server_version", lambda exe: (6, 2, 14))
    with pytest.raises(EmbeddedRedisError, match=r"older than 7\.0"):
        EmbeddedRedis(tmp_path).start()
