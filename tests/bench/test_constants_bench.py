"""The constants benchmark still runs end to end (tiny sizes; speed is measured by running it)."""

from __future__ import annotations

import json
from pathlib import Path

from bench import constants
from tests.redis_fixture import RedisServer


def test_constants_benchmark_runs_and_writes_its_results(tmp_path: Path, redis_server: RedisServer) -> None:
    args = ["--results", str(tmp_path), "--sessions", "4", "--requests", "2", "--steps", "2"]
    constants.main([*args, "--redis-url", redis_server.url])
    result = json.loads((tmp_path / "constants.json").read_text())
    assert list(result["runs"]) == list(constants.LAYOUTS)
    assert all(r["timesteps_per_s"] > 0 for r in result["runs"].values())
    assert result["runs"]["L = 16 (all)"]["memory_padding"] == 0
    assert (tmp_path / "constants.md").read_text().startswith("Attention decoder")
