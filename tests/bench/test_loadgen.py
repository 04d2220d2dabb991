"""The load generator against real servers (carryover and the naive baseline), tiny runs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from bench import loadgen, servers
from bench.clients import TRANSPORTS
from bench.loadgen import LoadConfig, run_load
from tests.redis_fixture import RedisServer

RESULT_KEYS = {"requests", "steps", "requests_per_s", "steps_per_s", "p50_ms", "p95_ms", "p99_ms", "max_ms"}
RESULT_KEYS |= {"errors", "goodput_per_s", "loadgen_cpu_percent", "latency_cdf_ms", "metrics", "config"}


@pytest.fixture(scope="module")
def running(redis_server: RedisServer) -> Iterator[dict[str, servers.Server]]:
    """carryover and the naive server on the shared Redis, started side by side."""
    both = {"carryover": servers.carryover(redis_server.url).start(), "naive": servers.naive(redis_server.url).start()}
    try:
        for server in both.values():
            server.wait_ready()
        yield both
    finally:
        for server in both.values():
            server.stop()


def tiny(url: str, **overrides: object) -> LoadConfig:
    settings: dict[str, object] = {"sessions": 2, "chunk": "1-3", "duration_s": 0.6, "warmup_s": 0.1}
    return LoadConfig(url=url, progress=False, **(settings | overrides))  # type: ignore[arg-type]


def check(result: dict[str, object]) -> None:
    assert set(result) >= RESULT_KEYS
    assert result["errors"] == 0, result["error_samples"]
    assert isinstance(result["steps_per_s"], float) and result["steps_per_s"] > 0


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_every_transport_drives_carryover(running: dict[str, servers.Server], transport: str) -> None:
    result = await run_load(tiny(running["carryover"].url, transport=transport, exactly_once=transport == "http"))
    check(result)
    metrics = result["metrics"]
    assert metrics["batch_rows"]["model_calls"] > 0
    assert metrics["stages"]["model_run"]["mean_ms"] > 0
    assert metrics["stages"]["redis_read"]["count"] > 0


async def test_open_loop_counts_arrivals_and_goodput(running: dict[str, servers.Server]) -> None:
    result = await run_load(tiny(running["carryover"].url, transport="ws", rate=60.0, arrival="poisson"))
    check(result)
    assert result["arrived"] > 0 and result["requests"] + result["unanswered"] == result["arrived"]
    assert 0 < result["goodput_per_s"] <= result["requests_per_s"]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_the_same_client_drives_the_naive_server(running: dict[str, servers.Server], transport: str) -> None:
    result = await run_load(tiny(running["naive"].url, transport=transport, rate=50.0, arrival="fixed"))
    check(result)
    assert result["metrics"] is None  # the naive server has no /metrics


def test_command_line_writes_the_result(running: dict[str, servers.Server], tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    url = running["carryover"].url
    argv = ["--sessions", "2", "--chunk", "2,4", "--duration", "0.4", "--warmup", "0.1", "--no-progress"]
    loadgen.main(["--url", url, *argv, "--out", str(out)])
    result = json.loads(out.read_text())
    check(result)
    assert result["steps"] % 2 == 0


def test_chunk_specs() -> None:
    assert loadgen.chunk_sizes("16") == [16]
    assert loadgen.chunk_sizes("1-3") == [1, 2, 3]
    assert loadgen.chunk_sizes("1,16") == [1, 16]
    with pytest.raises(ValueError, match="chunk spec"):
        loadgen.chunk_sizes("0-2")


def test_naive_outputs_equal_carryover(running: dict[str, servers.Server]) -> None:
    """The baseline does the same work: the same sequence, split differently, gives the same
    logits and step count on both servers."""
    tokens = np.random.default_rng(3).integers(0, 90, size=17).tolist()

    def run(url: str, splits: list[int]) -> tuple[int, np.ndarray]:
        with httpx.Client(base_url=url, timeout=30) as http:
            sid = http.post("/v1/sessions", json={}).json()["session_id"]
            logits, at, step = [], 0, 0
            for n in splits:
                reply = http.post(f"/v1/sessions/{sid}/step", json={"inputs": {"tokens": tokens[at : at + n]}})
                assert reply.status_code == 200, reply.text
                logits.append(np.asarray(reply.json()["outputs"]["logits"], np.float32))
                step, at = reply.json()["step"], at + n
        return step, np.concatenate(logits)

    naive_step, naive = run(running["naive"].url, [5, 1, 11])
    service_step, service = run(running["carryover"].url, [17])
    assert naive_step == service_step == 17
    assert naive.shape == service.shape == (17, 103)
    np.testing.assert_allclose(naive, service, rtol=1e-5, atol=1e-5)
