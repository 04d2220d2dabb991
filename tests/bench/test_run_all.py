"""``bench.run_all`` end to end on a one-point-per-server matrix, and the raw ORT baseline."""

from __future__ import annotations

import json
from pathlib import Path

from bench import run_all
from bench.baselines import raw_ort
from tests.redis_fixture import RedisServer


def test_run_all_writes_results_plots_and_summary(redis_server: RedisServer, tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "README.md").write_text("intro\n<!-- results:start -->\nold\n<!-- results:end -->\nend\n")
    matrix = ["--sessions", "2", "--chunks", "2", "--transports", "http"]
    argv = ["--quick", *matrix, "--duration", "0.3", "--warmup", "0.1", "--raw-seconds", "0.1"]
    out = ["--results", str(tmp_path / "run_all.json"), "--docs", str(docs)]
    run_all.main([*argv, "--redis-url", redis_server.url, *out])
    result = json.loads((tmp_path / "run_all.json").read_text())
    assert {"cpu", "cpus", "onnxruntime", "redis_server"} <= set(result["machine"])
    assert [p["server"] for p in result["points"]] == ["service", "unbatched", "naive"]
    for point in result["points"]:
        assert point["errors"] == 0 and point["steps_per_s"] > 0, point
    assert result["raw_ort"][0]["steps_per_s"] > 0
    (stage,) = result["breakdown"]
    assert stage["stages"]["queue_wait"]["count"] > 0  # instrumented now (service/metrics.py)
    assert stage["batch_rows"]["model_calls"] > 0
    for name in ("throughput", "latency_cdf", "batch_sizes", "stages"):
        assert (docs / f"{name}.png").stat().st_size > 1000
    readme = (docs / "README.md").read_text()
    assert "old" not in readme and "| 2 | 2 |" in readme and readme.endswith("end\n")


def test_expected_duration_of_the_full_matrix_is_bounded() -> None:
    args = run_all.parse_args([])
    assert args.sessions == [1, 16, 64, 256, 1024] and args.chunks == [1, 16]
    assert 10 * 60 < run_all.expected_seconds(args) < args.max_minutes * 60


def test_raw_ort_measures_a_shape() -> None:
    out = raw_ort.measure(raw_ort.load(threads=1), batch=2, steps=3, seconds=0.05)
    assert out["calls"] >= 3 and out["steps_per_s"] > 0
