"""carryover against the naive server, back to back in one run: the ratios of the issue's goals.

    python -m bench.ab                      # 3 rounds × {1, 256} sessions × {HTTP, WS}, chunk 1
    python -m bench.ab --rounds 1 --duration 2 --sessions 1 --transports http

Both servers run at once against one private Redis (an idle server costs nothing), and every
point is measured on carryover and at once on the naive server, so the two numbers of a ratio
share the machine's load of that moment; each round starts with another server (the first
point after a switch tends to measure worse). On a shared box, repeat (``--rounds``) and read
the min / median ratio. Per point: steps/s (throughput ratio, higher is better for carryover)
and p50 latency (latency ratio carryover / naive, lower is better). ``--serve-args`` passes
flags to ``carryover serve`` (e.g. ``"--workers 2"``), ``--naive-args`` to the naive server.
``--compare-root DIR`` also serves the carryover of another checkout (say ``git archive`` of
an older commit) as ``before``, measured between the two, so before, after and naive share
each point's moment. Writes the results JSON to ``--out`` (default ``bench/results/ab.json``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import statistics
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench import servers
from bench.loadgen import LoadConfig, run_load

ROOT = Path(__file__).resolve().parents[1]
TICKS = os.sysconf("SC_CLK_TCK")


def group_cpu_seconds(pgid: int) -> float:
    """CPU seconds (user + system) used so far by the live processes of process group ``pgid``
    (a server and its workers; ``servers`` starts each in its own group). Linux ``/proc`` only."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        if int(fields[2]) == pgid:  # field 5: pgrp
            total += int(fields[11]) + int(fields[12])  # fields 14, 15: utime, stime
    return total / TICKS


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="repeats of the whole set of points")
    p.add_argument("--sessions", type=int, nargs="+", default=[1, 256])
    p.add_argument("--transports", nargs="+", choices=("http", "ws", "ws-binary"), default=["http", "ws"])
    p.add_argument("--chunk", default="1", help="timesteps per request (loadgen --chunk)")
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per point")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--serve-args", default="", help="extra `carryover serve` flags")
    p.add_argument("--naive-args", default="", help="extra naive server flags")
    p.add_argument(
        "--compare-root",
        type=Path,
        help="also serve the carryover of this checkout (e.g. `git archive` of an older commit) as 'before'",
    )
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ab.json")
    return p.parse_args(argv)


async def point(server: servers.Server, sessions: int, transport: str, args: argparse.Namespace) -> dict[str, Any]:
    """One load point; also the server's CPU milliseconds per request over the whole run (warm-up
    included), a number that a loaded machine disturbs far less than rates and latencies."""
    assert server.pid is not None
    config = LoadConfig(
        url=server.url,
        sessions=sessions,
        chunk=args.chunk,
        transport=transport,
        duration_s=args.duration,
        warmup_s=args.warmup,
        progress=False,
        metrics=False,
    )
    cpu = group_cpu_seconds(server.pid)
    result = await run_load(config)
    cpu = group_cpu_seconds(server.pid) - cpu
    keep = ("steps_per_s", "p50_ms", "p99_ms", "errors", "loadgen_cpu_percent")
    requests = result["requests_per_s"] * (config.duration_s + config.warmup_s)  # about: the warm-up's too
    return {k: result[k] for k in keep} | {"server_cpu_ms_per_request": round(1000 * cpu / max(requests, 1), 3)}


async def rounds(
    service: servers.Server, naive: servers.Server, before: servers.Server | None, args: argparse.Namespace
) -> list[dict[str, Any]]:
    out = []
    for r in range(args.rounds):
        for sessions in args.sessions:
            for transport in args.transports:
                # Each round starts with another server: the first point after a switch measured
                # worse here whichever server it was (3 ms p50 as second, 7-10 ms as first).
                order = [("service", service), ("naive", naive)] + ([("before", before)] if before else [])
                order = order[r % len(order) :] + order[: r % len(order)]
                got = {name: await point(server, sessions, transport, args) for name, server in order}
                ours, theirs, older = got["service"], got["naive"], got.get("before")
                row: dict[str, Any] = {
                    "round": r,
                    "sessions": sessions,
                    "transport": transport,
                    "service": ours,
                    "naive": theirs,
                    "throughput_ratio": round(ours["steps_per_s"] / max(theirs["steps_per_s"], 1e-9), 3),
                    "p50_ratio": round(ours["p50_ms"] / max(theirs["p50_ms"], 1e-9), 3),
                    "cpu_ratio": round(
                        ours["server_cpu_ms_per_request"] / max(theirs["server_cpu_ms_per_request"], 1e-9), 3
                    ),
                }
                if older is not None:
                    row["before"] = older
                    row["before_throughput_ratio"] = round(older["steps_per_s"] / max(theirs["steps_per_s"], 1e-9), 3)
                    row["before_p50_ratio"] = round(older["p50_ms"] / max(theirs["p50_ms"], 1e-9), 3)
                    print(
                        f"   before: {older['steps_per_s']:>8,.0f} steps/s p50 {older['p50_ms']:6.2f} ms, "
                        f"x{row['before_throughput_ratio']:.2f} steps/s, p50 x{row['before_p50_ratio']:.2f}"
                    )
                out.append(row)
                print(
                    f"round {r} {transport:>9} {sessions:>4} sessions: service {ours['steps_per_s']:>8,.0f} steps/s "
                    f"p50 {ours['p50_ms']:6.2f} ms | naive {theirs['steps_per_s']:>8,.0f} steps/s "
                    f"p50 {theirs['p50_ms']:6.2f} ms | x{row['throughput_ratio']:.2f} steps/s, "
                    f"p50 x{row['p50_ratio']:.2f} | server CPU/request {ours['server_cpu_ms_per_request']:.2f} vs "
                    f"{theirs['server_cpu_ms_per_request']:.2f} ms",
                    flush=True,
                )
    return out


def summarise(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (transport, sessions): min / median / max of both ratios over the rounds."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for p in points:
        groups.setdefault((p["transport"], p["sessions"]), []).append(p)
    out = []
    for (transport, sessions), rows in groups.items():
        tr = [r["throughput_ratio"] for r in rows]
        lr = [r["p50_ratio"] for r in rows]
        cr = [r["cpu_ratio"] for r in rows]
        older = {}
        if all("before" in r for r in rows):
            bt, bl = [r["before_throughput_ratio"] for r in rows], [r["before_p50_ratio"] for r in rows]
            older = {
                "before_throughput_ratio": {"min": min(bt), "median": statistics.median(bt), "max": max(bt)},
                "before_p50_ratio": {"min": min(bl), "median": statistics.median(bl), "max": max(bl)},
            }
        out.append(
            {
                "transport": transport,
                "sessions": sessions,
                "throughput_ratio": {"min": min(tr), "median": statistics.median(tr), "max": max(tr)},
                "p50_ratio": {"min": min(lr), "median": statistics.median(lr), "max": max(lr)},
                "cpu_per_request_ratio": {"min": min(cr), "median": statistics.median(cr), "max": max(cr)},
                "service_steps_per_s_median": statistics.median(r["service"]["steps_per_s"] for r in rows),
                "naive_steps_per_s_median": statistics.median(r["naive"]["steps_per_s"] for r in rows),
                "service_p50_ms_median": statistics.median(r["service"]["p50_ms"] for r in rows),
                "naive_p50_ms_median": statistics.median(r["naive"]["p50_ms"] for r in rows),
            }
            | older
        )
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="carryover-ab-") as tmp, ExitStack() as stack:
        redis_url = stack.enter_context(servers.redis(Path(tmp))).url
        service = stack.enter_context(servers.carryover(redis_url, *shlex.split(args.serve_args)))
        naive = stack.enter_context(servers.naive(redis_url, *shlex.split(args.naive_args)))
        before = None
        if args.compare_root:
            older = servers.carryover(redis_url, *shlex.split(args.serve_args), root=args.compare_root)
            before = stack.enter_context(older)
        points = asyncio.run(rounds(service, naive, before, args))
    summary = summarise(points)
    for s in summary:
        t, lat = s["throughput_ratio"], s["p50_ratio"]
        print(
            f"{s['transport']:>9} {s['sessions']:>4} sessions: "
            f"steps/s ratio min {t['min']:.2f} median {t['median']:.2f}"
            f" | p50 ratio min {lat['min']:.2f} median {lat['median']:.2f}"
            f" | CPU/request ratio median {s['cpu_per_request_ratio']['median']:.2f}"
        )
        if "before_throughput_ratio" in s:
            bt, bl = s["before_throughput_ratio"], s["before_p50_ratio"]
            print(
                f"{'':>9} before: steps/s ratio min {bt['min']:.2f} median {bt['median']:.2f}"
                f" | p50 ratio min {bl['min']:.2f} median {bl['median']:.2f}"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    setup = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"}
    args.out.write_text(json.dumps({"setup": setup, "points": points, "summary": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
