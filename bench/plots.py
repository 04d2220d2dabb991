"""Plots of the benchmark results (PNG files next to the JSON the benchmarks write).

python -m bench.plots        # after bench.engine and/or bench.api
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

RESULTS = Path(__file__).parent / "results"


def engine_plot(result: dict[str, Any], target: Path) -> None:
    runs = result["runs"]
    labels = [str(r["steps_per_request"]) for r in runs]
    series = [
        ("batching off (1 row)", "unbatched_steps_per_s", "#bbbbbb"),
        ("batching on (64 rows)", "batched_steps_per_s", "#2f6db5"),
        ("raw ONNX Runtime, same shapes", "raw_ort_steps_per_s", "#9fc5e8"),
    ]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.26
    for i, (name, key, color) in enumerate(series):
        xs = [j + (i - 1) * width for j in range(len(runs))]
        bars = ax.bar(xs, [r[key] for r in runs], width, label=name, color=color)
        if key == "batched_steps_per_s":
            for bar, r in zip(bars, runs, strict=True):
                ax.annotate(
                    f"{r['batching_speedup']}×\n{r['engine_vs_raw']:.0%} of raw",
                    (bar.get_x() + width / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
    ax.set_xticks(range(len(runs)), labels)
    ax.set_xlabel("timesteps per request")
    ax.set_ylabel("timesteps / s")
    ax.set_title(f"engine throughput, {result['sessions']} concurrent sessions")
    ax.legend(fontsize=7, loc="upper left")
    ax.margins(y=0.25)
    fig.tight_layout()
    fig.savefig(target, dpi=120)
    plt.close(fig)


def api_plot(result: dict[str, Any], target: Path) -> None:
    names = ["HTTP", "WebSocket"]
    data = [result["http"], result["ws"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(7, 3))
    left.bar(names, [d["requests_per_s"] for d in data], color=["#2f6db5", "#9fc5e8"])
    left.set_ylabel("requests / s")
    left.set_title(f"{result['clients']} concurrent clients")
    for offset, key in ((-0.2, "p50_ms"), (0.2, "p99_ms")):
        right.bar([i + offset for i in range(2)], [d[key] for d in data], 0.4, label=key.replace("_ms", ""))
    right.set_xticks(range(2), names)
    right.set_ylabel("latency (ms)")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(target, dpi=120)
    plt.close(fig)


def plot_all(results: Path = RESULTS) -> None:
    for name, plot in (("engine", engine_plot), ("api", api_plot)):
        source = results / f"{name}.json"
        if source.exists():
            plot(json.loads(source.read_text()), results / f"{name}.png")
            print(f"wrote {results / name}.png")


def main() -> None:
    plot_all()


if __name__ == "__main__":
    main()
