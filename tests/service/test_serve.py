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
from pydantic import ValidationError

from model_export.verify import random_inputs
from service.config import Settings, env_name
from service.engine.model import RecurrentModel
from service.serve import settings_cli_source, settings_from_args, settings_table, settings_to_env
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
    text = " ".join(text.split())  # argparse wraps lines
    for name in Settings.model_fields:
        assert f"[env: {env_name(name)}]" in text
    assert text.count("(default: ") == len(Settings.model_fields)


def parse(*argv: str) -> Settings:
    parser = argparse.ArgumentParser()
    source = settings_cli_source(parser)
    return settings_from_args(source, parser.parse_args(argv))


def test_flags_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARRYOVER_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("CARRYOVER_PORT", "9001")
    s = parse("--port", "9002", "--model", "a=/x.onnx", "--model", "b=/y.onnx", "--providers", "cpu")
    assert (s.port, s.max_batch_size, s.providers) == (9002, 7, ["cpu"])
    assert s.model_paths() == {"a": Path("/x.onnx"), "b": Path("/y.onnx")}
    # and the workers rebuild exactly these settings from the environment
    monkeypatch.delenv("CARRYOVER_MAX_BATCH_SIZE")
    for key, value in settings_to_env(s).items():
        monkeypatch.setenv(key, value)
    assert Settings() == s


def test_flag_names_and_list_forms() -> None:
    s = parse(
        *("--session-ttl", "60", "--redis-timeout", "0.5", "--max-batch-size", "3", "--data-dir", "/d"),
        *("--state", "h0:hn", "--state", "c0:cn:1", "--providers", "cuda", "cpu", "--workers", "2"),
    )
    assert (s.session_ttl_s, s.redis_timeout_s, s.max_batch_size, s.data_dir, s.workers) == (60, 0.5, 3, Path("/d"), 2)
    assert (s.state, s.providers) == (["h0:hn", "c0:cn:1"], ["cuda", "cpu"])
    assert s.models == Settings().models  # the default when no --model is given
    assert parse("--models", '["a=/x.onnx", "b=/y.onnx"]').models == parse("--model", "a=/x.onnx,b=/y.onnx").models
    assert parse("--session-ttl-s", "5", "--redis-url", "redis://r:6379/0").redis_url == "redis://r:6379/0"
    with pytest.raises(ValidationError):
        parse("--session-ttl", "soon")  # `carryover serve` prints it and exits 2
    with pytest.raises(SystemExit):
        parse("--no-such-flag", "1")


def test_an_unknown_environment_variable_stops_serve(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.cli import main

    monkeypatch.setenv("CARRYOVER_SESSION_TTL", "60")  # the real name ends in _S
    assert main(["serve", "--port", "1"]) == 2
    assert "unknown setting CARRYOVER_SESSION_TTL (did you mean CARRYOVER_SESSION_TTL_S?)" in capsys.readouterr().err
    monkeypatch.delenv("CARRYOVER_SESSION_TTL")
    monkeypatch.setenv("CARRYOVER_MAX_BATCH_SIZE", "lots")  # a bad value: a message, not a traceback
    assert main(["serve", "--port", "1"]) == 2
    assert "max_batch_size" in capsys.readouterr().err


def test_readme_configuration_table_matches_settings() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = settings_table()
    assert table in readme, f"regenerate README.md's configuration table from settings_table():\n{table}"


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
                    np.asarray(second["outputs"]["y"]),  # type: ignore[index]
                ]
            )
        }
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
