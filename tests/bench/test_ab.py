"""bench/ab.py: the ratios it summarises and the CPU it reads (the servers and load are bench/servers.py's
and bench/loadgen.py's, tested there)."""

from __future__ import annotations

import os
import time

from bench.ab import group_cpu_seconds, summarise


def _point(round_: int, ours: float, theirs: float, p50: float) -> dict[str, object]:
    return {
        "round": round_,
        "sessions": 1,
        "transport": "http",
        "service": {"steps_per_s": ours, "p50_ms": p50},
        "naive": {"steps_per_s": theirs, "p50_ms": 1.0},
        "throughput_ratio": ours / theirs,
        "p50_ratio": p50,
        "cpu_ratio": 0.5,
    }


def test_summary_is_min_median_max_over_rounds() -> None:
    points = [_point(0, 300, 100, 1.2), _point(1, 200, 100, 0.9), _point(2, 500, 100, 1.0)]
    (row,) = summarise(points)
    assert row["throughput_ratio"] == {"min": 2.0, "median": 3.0, "max": 5.0}
    assert row["p50_ratio"] == {"min": 0.9, "median": 1.0, "max": 1.2}
    assert row["service_steps_per_s_median"] == 300 and "before_throughput_ratio" not in row


def test_group_cpu_seconds_counts_this_process_group() -> None:
    before = group_cpu_seconds(os.getpgrp())
    deadline = time.process_time() + 0.2
    while time.process_time() < deadline:  # burn 0.2 s of CPU
        pass
    assert group_cpu_seconds(os.getpgrp()) - before >= 0.15
