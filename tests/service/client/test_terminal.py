"""``carryover client`` (``service/client/terminal.py``) against a real server."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from model_export.verify import random_inputs
from service.client import Client
from service.client.terminal import file_mode, interactive
from service.engine.model import RecurrentModel
from tests.engines import assert_matches_offline
from tests.live_server import LiveServer


def test_terminal_client_shows_predictions(api_server: LiveServer) -> None:
    with Client(api_server.url) as client:
        model: dict[str, Any] = next(m for m in client.models() if m["name"] == "tokens")
        session = client.create("tokens")
        out = io.StringIO()
        interactive(session, model, stdin=io.StringIO("abc\n:gen 5\n:reset\nzz\n:quit\n"), out=out)
        text = out.getvalue()
        assert f"session {session.id}" in text and "[step 4] next:" in text and "%" in text
        assert "reset: step 0" in text and "[step 3] next:" in text  # 'zz' + newline after the reset


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
