"""``carryover serve`` as a user runs it: real processes, real ports, SIGTERM, replicas."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from model_export.verify import random_inputs
from service.config import Settings
from service.engine.model import RecurrentModel
from service.serve import add_settings_arguments, settings_from_args, settings_to_env
from tests.conftest import Exported
from tests.engines import assert_matches_offline
from tests.redis_fixture import RedisServer, free_port

START_TIMEOUT_S = 120


def test_every_setting_has_a_flag_and_env_var(capsys: pytest.CaptureFixture[str]) -> None:
    from service.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = capsys.readouterr().out
    for flag in (
        "--host",
        "--port",
        "--workers",
        "--model",
        "--state",
        "--redis-url",
        "--max-batch-size",
        "--max-batch-tokens",
        "--max-wait-us",
        "--max-queue",
        "--max-steps-per-request",
        "--session-ttl",
        "--providers",
        "--max-body-bytes",
        "--data-dir",
    ):
        assert flag in text
    assert text.count("CARRYOVER_") >= len(Settings.model_fields)


def test_flags_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    monkeypatch.setenv("CARRYOVER_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("CARRYOVER_PORT", "9001")
    s = settings_from_args(
        parser.parse_args(["--port", "9002", "--model", "a=/x.onnx", "--model", "b=/y.onnx", "--providers", "cpu"])
    )
    assert (s.port, s.max_batch_size, s.providers) == (9002, 7, ["cpu"])
    assert s.model_paths() == {"a": Path("/x.onnx"), "b": Path("/y.onnx")}
    # and the workers rebuild exactly these settings from the environment
    monkeypatch.delenv("CARRYOVER_MAX_BATCH_SIZE")
    for key, value in settings_to_env(s).items():
        monkeypatch.setenv(key, value)
    assert Settings() == s


class ServeProcess:
    def __init__(self, tmp: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = (tmp / f"serve-{self.port}.log").open("wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--port", str(self.port), *args],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.terminate()
                raise RuntimeError(f"carryover serve did not become ready: {Path(self.log.name).read_text()[-3000:]}")
            time.sleep(0.2)

    def terminate(self, timeout_s: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout_s)
        self.log.close()
        return code


@pytest.fixture
def gru_model(exported: dict[str, Exported]) -> Iterator[str]:
    yield f"gru={exported['gru_stacked'].sequence}"


def step(url: str, sid: str, x: np.ndarray, at: int) -> dict[str, object]:
    r = httpx.post(f"{url}/v1/sessions/{sid}/step", json={"inputs": {"x": x.tolist()}, "step": at}, timeout=30)
    assert r.status_code == 200, r.text
    data: dict[str, object] = r.json()
    return data


def test_serve_with_embedded_redis_survives_a_restart(
    tmp_path: Path, gru_model: str, loaded: dict[str, RecurrentModel]
) -> None:
    model = loaded["gru_stacked"]
    rng = np.random.default_rng(0)
    xs = [random_inputs(model.contract, n, rng)["x"] for n in (3, 4)]
    data_dir = str(tmp_path / "data")
    server = ServeProcess(tmp_path, "--model", gru_model, "--data-dir", data_dir)
    try:
        sid = httpx.post(server.url + "/v1/sessions", json={}).json()["session_id"]
        first = step(server.url, sid, xs[0], 0)
    finally:
        assert server.terminate() == 0  # SIGTERM: graceful, exit code 0
    assert not list(Path(data_dir).glob("*.sock"))  # the embedded Redis went down with it

    server = ServeProcess(tmp_path, "--model", gru_model, "--data-dir", data_dir)
    try:
        assert httpx.get(f"{server.url}/v1/sessions/{sid}").json()["step"] == 3  # state survived the restart
        second = step(server.url, sid, xs[1], 3)
        state = np.load(__import__("io").BytesIO(httpx.get(f"{server.url}/v1/sessions/{sid}/state").content))
        outputs = {
            "y": np.concatenate(
                [
                    np.asarray(first["outputs"]["y"]),  # type: ignore[index]
                    np.asarray(second["outputs"]["y"]),
                ]
            )
        }  # type: ignore[index]
        assert_matches_offline(model, {"x": np.concatenate(xs)}, outputs, {"h0": state["h0"]})
    finally:
        assert server.terminate() == 0


def test_two_replicas_share_sessions_through_redis(
    tmp_path: Path, gru_model: str, loaded: dict[str, RecurrentModel]
) -> None:
    """Two independent server processes on one Redis: a session's requests alternate between
    them (as behind a load balancer) and the result is the offline run, exactly once."""
    redis_server = RedisServer(tmp_path / "redis")
    redis_server.start()
    model = loaded["gru_stacked"]
    rng = np.random.default_rng(1)
    replicas = []
    try:
        replicas = [ServeProcess(tmp_path, "--model", gru_model, "--redis-url", redis_server.url) for _ in range(2)]
        sid = httpx.post(replicas[0].url + "/v1/sessions", json={}).json()["session_id"]
        xs, outs, at = [], [], 0
        for i in range(8):
            x = random_inputs(model.contract, int(rng.integers(1, 5)), rng)["x"]
            reply = step(replicas[i % 2].url, sid, x, at)
            at = int(reply["step"])  # type: ignore[call-overload]
            xs.append(x)
            outs.append(np.asarray(reply["outputs"]["y"]))  # type: ignore[index]
        # a retry of the last request on the OTHER replica is a replay, not a second application
        retry = httpx.post(
            f"{replicas[1].url}/v1/sessions/{sid}/step",
            json={"inputs": {"x": xs[-1].tolist()}, "step": at - len(xs[-1])},
        )
        assert retry.status_code == 200 and retry.headers.get("Idempotent-Replay") == "true"
        state = np.load(__import__("io").BytesIO(httpx.get(f"{replicas[1].url}/v1/sessions/{sid}/state").content))
        assert int(state["carryover_step"]) == at
        assert_matches_offline(model, {"x": np.concatenate(xs)}, {"y": np.concatenate(outs)}, {"h0": state["h0"]})
    finally:
        for r in replicas:
            r.terminate()
        redis_server.stop()
