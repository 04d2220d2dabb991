"""The benchmarks still run end to end (tiny sizes; speed is measured by running them, not here)."""

from __future__ import annotations

import json
from pathlib import Path

from bench import api, engine


def test_engine_benchmark_runs_and_writes_its_results(tmp_path: Path) -> None:
    engine.main(
        [
            "--results",
            str(tmp_path),
            "--sessions",
            "6",
            "--requests",
            "2",
            "--steps",
            "3",
            "--ragged",
            "5",
            "--repeats",
            "3",
        ]
    )
    result = json.loads((tmp_path / "engine.json").read_text())
    run = result["runs"][0]
    assert run["batching_speedup"] > 0 and run["engine_vs_raw"] > 0
    assert sorted(run["engine_vs_raw_repeats"])[1] == run["engine_vs_raw"]  # the median of three runs
    assert len(run["raw_ort_before_after"]) == 2  # the ceiling around the reported run
    assert 1 <= run["redis_round_trips_per_batch"] <= 2  # the write, and a load only for uncached sessions
    assert {"buckets", "one_call"} <= set(result["bucketing"])
    assert (tmp_path / "engine.md").read_text().startswith("6 sessions")
    assert (tmp_path / "engine.png").stat().st_size > 1000


def test_carryover_bench_runs_a_benchmark(tmp_path: Path) -> None:
    from service.cli import main

    code = main(
        [
            "bench",
            "engine",
            "--results",
            str(tmp_path),
            "--sessions",
            "2",
            "--requests",
            "1",
            "--steps",
            "2",
            "--ragged",
            "2",
        ]
    )
    assert code == 0 and (tmp_path / "engine.json").exists()


def test_api_benchmark_runs_and_writes_its_results(tmp_path: Path) -> None:
    api.main(["--results", str(tmp_path), "--clients", "3", "--seconds", "1", "--steps", "2"])
    result = json.loads((tmp_path / "api.json").read_text())
    assert result["http"]["requests"] > 0 and result["ws"]["requests"] > 0
    assert (tmp_path / "api.png").stat().st_size > 1000
