"""Plots of the benchmark results (PNG files next to the JSON the benchmarks write).

python -m bench.plots        # after bench.engine and/or bench.api

``plot_matrix`` draws the four plots of a ``bench.run_all`` result (throughput vs sessions,
latency CDF, batch size distribution, stage breakdown) into docs/bench/.
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


def _label(ax: Any, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=6)


def _save(fig: Any, target: Path) -> None:
    fig.tight_layout()
    fig.savefig(target, dpi=120)
    plt.close(fig)


def _series(result: dict[str, Any]) -> list[tuple[str, str]]:
    setup = result["setup"]
    return [(s, t) for s in setup["servers"] for t in setup["transports"]]


def _measured(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in result["points"] if "skipped" not in p]


def throughput_plot(result: dict[str, Any], target: Path) -> None:
    chunks = result["setup"]["chunks"]
    fig, axes = plt.subplots(1, len(chunks), figsize=(5 * len(chunks), 3.8), squeeze=False)
    for ax, chunk in zip(axes[0], chunks, strict=True):
        for server, transport in _series(result):
            pts = sorted(
                (p["sessions"], p["steps_per_s"])
                for p in _measured(result)
                if (p["server"], p["transport"], p["chunk"]) == (server, transport, chunk)
            )
            if pts:
                style = "-" if transport == "http" else "--"
                ax.plot(*zip(*pts, strict=True), style, marker="o", ms=3, label=f"{server}, {transport}")
        raw = sorted((r["sessions"], r["steps_per_s"]) for r in result["raw_ort"] if r["chunk"] == chunk)
        if raw:
            ax.plot(*zip(*raw, strict=True), ":", marker="x", color="black", label="raw ORT, same shapes")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        _label(ax, "concurrent sessions", "timesteps / s", f"{chunk} timestep(s) per request")
    _save(fig, target)


def latency_cdf_plot(result: dict[str, Any], target: Path, sessions: int) -> None:
    chunks = result["setup"]["chunks"]
    fig, axes = plt.subplots(1, len(chunks), figsize=(5 * len(chunks), 3.6), squeeze=False)
    for ax, chunk in zip(axes[0], chunks, strict=True):
        for p in _measured(result):
            if p["sessions"] == sessions and p["chunk"] == chunk and p["latency_cdf_ms"]:
                q, ms = zip(*p["latency_cdf_ms"], strict=True)
                ax.plot(ms, [x / 100 for x in q], label=f"{p['server']}, {p['transport']}")
        ax.set_xscale("log")
        _label(ax, "latency (ms)", "share of requests", f"{sessions} sessions, {chunk} timestep(s) per request")
    _save(fig, target)


def batch_size_plot(result: dict[str, Any], target: Path) -> None:
    rows = [b for b in result["breakdown"] if b.get("batch_rows")]
    fig, ax = plt.subplots(figsize=(7, 3.4))
    width = 0.8 / max(len(rows), 1)
    for i, b in enumerate(rows):
        hist = b["batch_rows"]
        total = max(sum(hist["counts"]), 1)
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(hist["counts"]))]
        label = f"{b['transport']}, {b['chunk']} step(s)/request (mean {hist['mean_rows'] or 0:.1f} rows)"
        ax.bar(xs, [c / total for c in hist["counts"]], width, label=label)
    if rows:
        ax.set_xticks(
            range(len(rows[0]["batch_rows"]["le"])),
            [f"≤{le:g}" if isinstance(le, float) else f"≤{le}" for le in rows[0]["batch_rows"]["le"]],
        )
    sessions = rows[0]["sessions"] if rows else "?"
    _label(ax, "rows (sessions) per model call", "share of model calls", f"batch sizes, service at {sessions} sessions")
    _save(fig, target)


def stage_plot(result: dict[str, Any], target: Path) -> None:
    rows = result["breakdown"]
    stages = list(rows[0]["stages"]) if rows else []
    fig, ax = plt.subplots(figsize=(7, 3.4))
    height = 0.8 / max(len(rows), 1)
    for i, b in enumerate(rows):
        ys = [j + (i - (len(rows) - 1) / 2) * height for j in range(len(stages))]
        values = [b["stages"][s].get("mean_ms") or 0.0 for s in stages]
        ax.barh(ys, values, height, label=f"{b['transport']}, {b['chunk']} step(s)/request")
        for y, s in zip(ys, stages, strict=True):
            if i == 0 and "status" in b["stages"][s]:
                ax.annotate(
                    b["stages"][s]["status"], (0, y), fontsize=6, va="center", xytext=(3, 0), textcoords="offset points"
                )
    ax.set_yticks(range(len(stages)), [s.replace("_", " ") for s in stages])
    ax.invert_yaxis()
    ax.set_xlabel("mean ms per observation")
    sessions = rows[0]["sessions"] if rows else "?"
    ax.set_title(f"where a request's time goes, service at {sessions} sessions")
    ax.legend(fontsize=6)
    _save(fig, target)


def scale_plot(result: dict[str, Any], target: Path) -> None:
    """p50 and p99 per operation at the baseline, the big level and the baseline again (``bench.scale``)."""
    levels = result["levels"]
    ops = list(levels[0]["latency"])
    names = ("", "", " again")
    colors = {"p50_ms": ("#9fc5e8", "#2f6db5", "#cfe2f3"), "p99_ms": ("#bbbbbb", "#555555", "#e0e0e0")}
    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.13
    bars = [(key, i) for key in colors for i in range(len(levels))]
    for k, (key, i) in enumerate(bars):
        xs = [j + (k - (len(bars) - 1) / 2) * width for j in range(len(ops))]
        label = f"{key[:3]}, {levels[i]['sessions']:,} sessions{names[i]}"
        ax.bar(xs, [levels[i]["latency"][op][key] for op in ops], width, label=label, color=colors[key][i])
    ax.set_xticks(range(len(ops)), ops)
    _label(ax, "operation (sequential requests)", "latency (ms)", "latency against the number of idle sessions")
    _save(fig, target)


def plot_matrix(result: dict[str, Any], target: Path) -> None:
    """The four PNGs of a ``run_all`` result, into the folder ``target``."""
    sessions = result["breakdown"][0]["sessions"] if result["breakdown"] else max(result["setup"]["sessions"])
    throughput_plot(result, target / "throughput.png")
    latency_cdf_plot(result, target / "latency_cdf.png", sessions)
    batch_size_plot(result, target / "batch_sizes.png")
    stage_plot(result, target / "stages.png")


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
