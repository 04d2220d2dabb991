"""``carryover client`` (``service/client/terminal.py``) against a real server: scripted stdin into
``interactive()``, the CLI's one-line errors, and the real command in a subprocess (no log lines)."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from model_export.verify import random_inputs, unpadded_run
from service.cli import build_parser
from service.client import Client, Session
from service.client.terminal import Terminal, file_mode, interactive, run_client
from service.engine.model import RecurrentModel
from tests.engines import assert_matches_offline
from tests.live_server import LiveServer
from tests.redis_fixture import free_port

REPO = Path(__file__).resolve().parents[3]


def greedy(model: RecurrentModel, text: str, count: int) -> str:
    """The offline greedy continuation of ``text`` read from the initial state."""
    vocab = model.contract.vocab
    assert vocab is not None
    index = {c: i for i, c in enumerate(vocab)}
    ids = [index.get(c, model.contract.unk_id) for c in text]
    out = ""
    for _ in range(count):
        token = int(np.argmax(unpadded_run(model, {"tokens": np.array(ids, np.int64)})[0]["logits"][-1]))
        ids.append(token)
        out += vocab[token]
    return out


def run_lines(client: Client, lines: str, session: Session | None = None) -> tuple[str, Session]:
    """``interactive()`` over ``lines`` in a new session of the token model (or ``session``)."""
    model: dict[str, Any] = next(m for m in client.models() if m["name"] == "tokens")
    session = session or client.create("tokens")
    out = io.StringIO()
    interactive(session, model, stdin=io.StringIO(lines), out=out)
    return out.getvalue(), session


def test_terminal_client_shows_predictions(api_server: LiveServer) -> None:
    with Client(api_server.url) as client:
        text, session = run_lines(client, "abc\n:gen 5\n:reset\nzz\n:quit\n")
    assert f"session {session.id}" in text and "[step 4] next:" in text and "%" in text
    assert "reset: step 0" in text and "[step 3] next:" in text  # 'zz' + newline after the reset


def test_gen_continues_from_the_reset_state(api_server: LiveServer, loaded: dict[str, RecurrentModel]) -> None:
    model = loaded["token_gru"]
    with Client(api_server.url) as client:
        text, session = run_lines(client, "abc\n:gen 4\n:reset\n:gen 3\nab\n:gen 6\n")
        assert session.info()["step"] == len("ab\n") + 6
    lines = text.splitlines()
    assert lines[2] == greedy(model, "abc\n", 4)
    assert lines[4] == "nothing to continue yet: type some text first"  # nothing read since the reset
    assert lines[6] == greedy(model, "ab\n", 6)  # from the reset state, not from before it


def test_bad_commands_and_server_errors_are_one_line(api_server: LiveServer) -> None:
    with Client(api_server.url) as client:
        text, session = run_lines(client, "ab\n:gen abc\n:gen 0\n:gen 2 3\n:frobnicate\n")
        lines = text.splitlines()
        assert all(line.startswith("usage: :gen N") for line in lines[2:5]), lines
        assert lines[5].startswith("unknown command ':frobnicate'") and len(lines) == 6
        assert session.info()["step"] == 3  # none of them touched the session
        # the session vanishes under the client: one line per command, and the loop goes on
        session.delete()
        text, _ = run_lines(client, "ab\n:reset\n", session)
    lines = text.splitlines()[1:]
    assert len(lines) == 2 and all(line.startswith("session_not_found: ") for line in lines), lines


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--model", "nope"], "carryover client: model_not_found: "),
        (["--session", "no-such-session"], "carryover client: session_not_found: "),
    ],
)
def test_cli_errors_are_one_line(
    api_server: LiveServer, argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = build_parser().parse_args(["client", "--url", api_server.url, *argv])
    assert run_client(args, stdin=io.StringIO(""), out=io.StringIO()) == 1
    err = capsys.readouterr().err
    assert err.startswith(expected) and err.count("\n") == 1, err


def test_cli_without_a_server_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    args = build_parser().parse_args(["client", "--url", url, "--retries", "0"])
    assert run_client(args, stdin=io.StringIO(""), out=io.StringIO()) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"carryover client: cannot reach the server at {url}: ") and err.count("\n") == 1, err


def test_the_command_prints_no_log_lines(api_server: LiveServer) -> None:
    script = "abc\n:gen 3\n:gen abc\n:reset\n:quit\n"
    done = subprocess.run(
        [sys.executable, "-m", "service", "client", "--url", api_server.url, "--model", "tokens"],
        input=script,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("session ") and lines[1].startswith("[step 4] next:")
    assert len(lines) == 5 and lines[3].startswith("usage: ") and lines[4] == "reset: step 0", lines


def test_terminal_client_file_mode(api_server: LiveServer, tmp_path: Path, loaded: dict[str, RecurrentModel]) -> None:
    model = loaded["gru_stacked"]
    x = random_inputs(model.contract, 11, np.random.default_rng(4))["x"]
    np.save(tmp_path / "x.npy", x)
    with Client(api_server.url) as client:
        models = {m["name"]: m for m in client.models()}
        session = client.create("gru")
        assert file_mode(session, models["gru"], tmp_path / "x.npy", tmp_path / "y.npz", chunk=4) == 0
        y = np.load(tmp_path / "y.npz")["y"]
        assert_matches_offline(model, {"x": x}, {"y": y}, {"h0": session.state()["h0"]})


def test_gen_runs_on_the_server(api_server: LiveServer, loaded: dict[str, RecurrentModel]) -> None:
    with Client(api_server.url) as client:
        model = next(m for m in client.models() if m["name"] == "tokens")
        out = io.StringIO()
        terminal = Terminal(client.create("tokens"), model, out)
        for line in ("ab", ":gen 5"):
            terminal.command(line)
        assert terminal.server_generates and terminal.session.step_count == 8  # one generate, not 5 steps
    assert out.getvalue().splitlines()[1] == greedy(loaded["token_gru"], "ab\n", 5)
