"""The scale benchmark runs end to end at tiny sizes (its numbers come from running it, not here)."""

from __future__ import annotations

import json
from pathlib import Path

from bench import scale


def test_scale_benchmark_counts_the_populated_sessions_and_writes_its_results(tmp_path: Path) -> None:
    scale.main(
        ["--sessions", "1500", "--baseline", "300", "--requests", "3", "--due", "600", "--results", str(tmp_path)]
    )

    result = json.loads((tmp_path / "scale.json").read_text())
    base, big, again = result["levels"]
    # The service's own count saw every copy (the benchmark checks the gauge against the index).
    assert base["sessions"] >= 300 and big["sessions"] >= 1500 and big["populated"] > 1000
    assert again["sessions"] == again["populated"] == 300  # Redis emptied, then refilled to the baseline
    assert set(result["ratios"]) == set(scale.OPS)
    assert 2000 < result["record"]["used_memory_per_session"] < 10_000
    # Sessions that expired at once are uncounted by the scrapes that follow, at both sizes.
    assert base["expiry"]["scrapes_until_exact"] and big["expiry"]["scrapes_until_exact"]
    assert big["expiry"]["index_after"] == big["expiry"]["live"] > big["sessions"]  # plus the measured creates
    assert all(lvl["redis_usec_per_script_call"] > 0 for lvl in result["levels"])
    assert (tmp_path / "scale.md").read_text().startswith(f"{big['sessions']:,} vs")
    assert (tmp_path / "scale.png").stat().st_size > 1000
