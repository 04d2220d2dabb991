"""``carryover serve`` as a user runs it: real processes, real ports, SIGTERM, replicas."""

from __future__ import annotations

import argparse
import os
import signal
import socket
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
from tests.redis_fixture import free_port

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
    """A real ``carryover serve`` subprocess on a free port (its own process group), its output in
    ``log_path``. ``wait_ready`` after ``__init__``, so that several start at once."""

    def __init__(self, tmp: Path, *args: str, wait: bool = True) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / f"serve-{self.port}.log"
        self.log = self.log_path.open("wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--port", str(self.port), *args],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.terminate()
                raise RuntimeError(f"carryover serve did not become ready: {self.output()[-3000:]}")
            time.sleep(0.2)

    def output(self) -> str:
        return self.log_path.read_text()

    def terminate(self, timeout_s: float = 60, sig: int = signal.SIGTERM) -> int:
        """SIGTERM (graceful; or ``sig``, e.g. SIGINT for Ctrl-C) and wait; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout_s)
        self.log.close()
        return code

    def kill(self) -> None:
        """SIGKILL to every process of the server, as when its container or host dies."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.log.close()


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
        # a second service cannot take the same data directory: one line, exit code 1
        rival = run_serve("--data-dir", data_dir, "--model", gru_model)
        assert (rival.returncode, rival.stdout) == (1, "")
        assert rival.stderr.startswith(f"carryover serve: data directory {data_dir} is in use")
        assert rival.stderr.count("\n") == 1
    finally:
        assert server.terminate(sig=signal.SIGINT) == 0  # Ctrl-C: graceful, exit code 0
    assert not list(Path(data_dir).glob("*.sock"))  # the embedded Redis went down with it
    log = server.output()
    assert "Traceback" not in log and "KeyboardInterrupt" not in log
    assert "embedded Redis (AOF under" in log and "external" not in log
    assert f"store Redis at {data_dir}/redis.sock" in log

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


def run_serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", "serve", *args], capture_output=True, text=True, timeout=START_TIMEOUT_S
    )


def test_start_errors_are_one_line_and_exit_code_1(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cases = {
            f"cannot listen on 127.0.0.1:{port}: Address already in use": ["--port", str(port)],
            "cannot use Redis at redis://127.0.0.1:1/0: ": ["--redis-url", "redis://127.0.0.1:1/0"],
            "model lm: no such file /no/such/model.onnx": ["--model", "lm=/no/such/model.onnx"],
            "cannot load API keys from /no/such/keys.txt": ["--api-keys-file", "/no/such/keys.txt"],
        }
        for message, args in cases.items():
            args = ["--port", str(free_port()), *args] if args[0] != "--port" else args
            done = run_serve("--data-dir", str(tmp_path / "data"), "--redis-timeout", "0.5", *args)
            assert done.returncode == 1, done.stderr
            assert done.stderr.startswith(f"carryover serve: {message}"), done.stderr
            assert done.stderr.count("\n") == 1, done.stderr  # one line, no traceback
