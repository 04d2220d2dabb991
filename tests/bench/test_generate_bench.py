"""The generation benchmark still runs end to end (tiny sizes; speed is measured by running it)."""

from __future__ import annotations

import json
from pathlib import Path

from bench import generate


def test_generate_benchmark_runs_and_writes_its_results(tmp_path: Path) -> None:
    generate.main(["--results", str(tmp_path), "--concurrency", "1", "4", "--tokens", "5", "--prompt", "3"])
    result = json.loads((tmp_path / "generate.json").read_text())
    assert [r["concurrent"] for r in result["runs"]] == [1, 4]
    assert all(r["tokens_per_s"] > 0 and r["gain"] > 0 for r in result["runs"])
    assert result["runs"][1]["mean_generation_rows_per_batch"] > 1  # the four shared batches
    assert (tmp_path / "generate.md").read_text().startswith("Generation, 5 tokens")
