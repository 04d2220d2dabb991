"""The whole benchmark in one command, bounded in time.

    python -m bench.run_all            # the matrix below, ~10 s per point (prints its duration first)
    python -m bench.run_all --quick    # a small matrix, 1 s per point: under 2 minutes

The matrix: sessions {1, 16, 64, 256, 1024} × timesteps per request {1, 16} × server {the
service, the service with ``--max-batch-size 1``, the naive baseline} × transport {HTTP, WS},
closed loop, each server in turn against one private Redis. Then raw ONNX Runtime on the batch
shapes the service ran (its mean rows per call at each point, × the chunk length), after the
servers have stopped. From the service's ``/metrics`` at 256 sessions (``--breakdown-sessions``):
the per-stage breakdown (queue wait, Redis read, model run, Redis write, serialisation; stages
the service does not instrument yet say so) and the batch size distribution.

Writes the results JSON (with the machine description) to ``--results``, and the plots
(throughput vs sessions, latency CDF, batch sizes, stage breakdown) and a summary table
(``summary.md``, also put into ``README.md`` between its result markers) to ``--docs``.
The full run writes to ``bench/results/run_all.json`` and ``docs/bench/``; ``--quick`` writes
everything to ``bench/results/quick/`` so a smoke run never replaces the published numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import redis

from bench import servers
from bench.loadgen import LoadConfig, run_load
from bench.machine import describe
from bench.summary import write_summary

ROOT = Path(__file__).resolve().parents[1]
FULL = {"sessions": [1, 16, 64, 256, 1024], "chunks": [1, 16], "duration": 10.0, "warmup": 2.0, "raw_seconds": 2.0}
QUICK = {"sessions": [1, 16], "chunks": [1, 16], "duration": 1.0, "warmup": 0.3, "raw_seconds": 0.3}
START_S = 8.0  # a server's start-up, for the estimate
MAX_BATCH = 64  # the service's default max_batch_size: raw ORT's batch when no metrics say otherwise


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small matrix, 1 s per point (< 2 minutes)")
    p.add_argument("--sessions", type=int, nargs="+", help="default: 1 16 64 256 1024 (quick: 1 16)")
    p.add_argument("--chunks", type=int, nargs="+", help="timesteps per request (default: 1 16)")
    p.add_argument("--servers", nargs="+", choices=servers.SERVERS, default=list(servers.SERVERS))
    p.add_argument("--transports", nargs="+", choices=("http", "ws", "ws-binary"), default=["http", "ws"])
    p.add_argument("--duration", type=float, help="measured seconds per point (default 10; quick 1)")
    p.add_argument("--warmup", type=float, help="seconds of load before each point is measured")
    p.add_argument("--raw-seconds", type=float, help="seconds per raw ONNX Runtime shape")
    p.add_argument("--breakdown-sessions", type=int, default=256, help="the sessions of the stage breakdown")
    p.add_argument("--max-minutes", type=float, default=30.0, help="points past this are skipped (bounded)")
    p.add_argument("--redis-url", help="use this Redis (not flushed) instead of a private redis-server")
    p.add_argument("--results", type=Path, help="the results JSON (default bench/results/run_all.json)")
    p.add_argument("--docs", type=Path, help="plots and summary table (default docs/bench/)")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for key in preset:
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    out = ROOT / "bench" / "results" / "quick" if args.quick else None
    args.results = args.results or (out / "run_all.json" if out else ROOT / "bench" / "results" / "run_all.json")
    args.docs = args.docs or out or ROOT / "docs" / "bench"
    return args


def expected_seconds(args: argparse.Namespace) -> float:
    points = len(args.sessions) * len(args.chunks) * len(args.servers) * len(args.transports)
    setup = sum(0.5 + s / 200 for s in args.sessions) * len(args.chunks) * len(args.servers) * len(args.transports)
    raw = len(args.sessions) * len(args.chunks) * (args.raw_seconds + 1)
    return float(points * (args.duration + args.warmup) + setup + START_S * len(args.servers) + raw)


def breakdown_sessions(args: argparse.Namespace) -> int:
    """``--breakdown-sessions`` if the matrix has it, else its largest session count."""
    wanted: int = args.breakdown_sessions
    return wanted if wanted in args.sessions else max(args.sessions)


async def run_server(name: str, url: str, args: argparse.Namespace, deadline: float) -> list[dict[str, Any]]:
    points = []
    for sessions in args.sessions:
        for chunk in args.chunks:
            for transport in args.transports:
                point: dict[str, Any] = {"server": name, "transport": transport, "sessions": sessions, "chunk": chunk}
                if time.monotonic() > deadline:
                    points.append(point | {"skipped": "past --max-minutes"})
                    continue
                config = LoadConfig(
                    url=url,
                    sessions=sessions,
                    chunk=str(chunk),
                    transport=transport,
                    duration_s=args.duration,
                    warmup_s=args.warmup,
                    progress=False,
                    metrics=name != "naive",
                )
                result = await run_load(config)
                result.pop("config")
                points.append(point | result)
                print(
                    f"{name:>9} {transport:>9} {sessions:>5} sessions × {chunk:>2} steps: "
                    f"{result['steps_per_s']:>10,.0f} steps/s  p99 {result['p99_ms']:8.2f} ms  "
                    f"errors {result['errors']}  loadgen CPU {result['loadgen_cpu_percent']}%",
                    flush=True,
                )
    return points


def raw_points(args: argparse.Namespace, points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Raw ORT at each (sessions, chunk): the service's mean rows per call there, × chunk."""
    from bench.baselines.raw_ort import load, measure

    model = load()
    out = []
    for sessions in args.sessions:
        for chunk in args.chunks:
            rows = [
                p["metrics"]["batch_rows"]["mean_rows"]
                for p in points
                if p["server"] == "service" and p["sessions"] == sessions and p["chunk"] == chunk
                if (p.get("metrics") or {}).get("batch_rows") and p["metrics"]["batch_rows"]["mean_rows"]
            ]
            batch = max(1, round(sum(rows) / len(rows))) if rows else min(sessions, MAX_BATCH)
            out.append({"sessions": sessions, "chunk": chunk} | measure(model, batch, chunk, args.raw_seconds))
    return out


def stage_breakdown(args: argparse.Namespace, points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    at = breakdown_sessions(args)
    return [
        {"transport": p["transport"], "sessions": at, "chunk": p["chunk"], **p["metrics"]}
        for p in points
        if p["server"] == "service" and p["sessions"] == at and p.get("metrics")
    ]


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    deadline = started + 60 * args.max_minutes
    points: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="carryover-bench-") as tmp, ExitStack() as stack:
        redis_url = args.redis_url or stack.enter_context(servers.redis(Path(tmp))).url
        for name in args.servers:
            with servers.by_name(name, redis_url) as server:
                points += asyncio.run(run_server(name, server.url, args, deadline))
            if not args.redis_url:  # our own Redis: start every server on an empty one
                with redis.Redis.from_url(redis_url) as r:
                    r.flushall()
    raw = raw_points(args, points)
    return {
        "machine": describe(),
        "setup": {
            "sessions": args.sessions,
            "chunks": args.chunks,
            "servers": {name: servers.SERVER_TEXT[name] for name in args.servers},
            "transports": args.transports,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "loop": "closed",
            "model": "bundled char LM (service/models/charlm.onnx, 2-layer GRU, H=256)",
        },
        "points": points,
        "raw_ort": raw,
        "breakdown": stage_breakdown(args, points),
        "seconds": round(time.monotonic() - started, 1),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    estimate = expected_seconds(args)
    print(f"run_all: expected duration ~{estimate / 60:.1f} min (bounded by --max-minutes {args.max_minutes})")
    result = run(args)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    args.docs.mkdir(parents=True, exist_ok=True)
    from bench.plots import plot_matrix

    plot_matrix(result, args.docs)
    write_summary(result, args.docs)
    print(f"run_all: {result['seconds']} s; wrote {args.results}, plots and summary.md in {args.docs}")


if __name__ == "__main__":
    main()
