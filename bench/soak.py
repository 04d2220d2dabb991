"""Soak run: many sessions, mixed HTTP / WebSocket JSON / WebSocket binary, for minutes; the
server's memory must stay flat, nothing may fail, and p99 must not drift.

    python -m bench.soak --minutes 10 --sessions 1000          # the full run
    python -m bench.soak --minutes 1 --sessions 100            # a short one

Starts a private Redis and ``carryover serve`` (the bundled char LM), opens ``--sessions``
sessions (one connection each, transports in turn), and lets each send exactly-once chunks of
1-16 tokens with ``--think-ms`` between them. Every ``--window`` seconds it records the
server's RSS (``/proc/PID/status``), requests, errors and latency p50/p99. The first window is
warm-up (allocators and caches filling); growth and drift are measured from its end. Verdict:
RSS growth < 5 %, no errors, last p99 within 2x the first. JSON to ``--out``, a plot beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.clients import TRANSPORTS, Chunk, Client, StepFailed, open_client
from bench.servers import ROOT, carryover, redis

RESULTS = ROOT / "bench" / "results"
OPEN_AT_ONCE = 32
MAX_RSS_GROWTH = 0.05
MAX_P99_DRIFT = 2.0


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from ``/proc`` (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


@dataclass
class Window:
    """One measurement window's latencies (seconds) and errors."""

    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def summary(self, t: float, rss: int) -> dict[str, Any]:
        lat = np.asarray(self.latencies) * 1000 if self.latencies else np.zeros(1)
        return {
            "t_s": round(t, 1),
            "rss_mib": round(rss / 2**20, 2),
            "requests": len(self.latencies),
            "errors": len(self.errors),
            "p50_ms": round(float(np.percentile(lat, 50)), 2),
            "p99_ms": round(float(np.percentile(lat, 99)), 2),
        }


async def open_all(url: str, sessions: int) -> list[Client]:
    gate = asyncio.Semaphore(OPEN_AT_ONCE)

    async def one(i: int) -> Client:
        async with gate:
            return await open_client(url, TRANSPORTS[i % len(TRANSPORTS)], exactly_once=True)

    return list(await asyncio.gather(*(one(i) for i in range(sessions))))


async def soak(url: str, pid: int, args: argparse.Namespace) -> dict[str, Any]:
    clients = await open_all(url, args.sessions)
    rng = random.Random(args.seed)
    chunks = [Chunk.of([rng.randrange(0, 90) for _ in range(rng.randint(1, 16))]) for _ in range(512)]
    start = time.monotonic()
    end = start + args.minutes * 60
    current = Window()
    windows: list[dict[str, Any]] = []
    error_samples: list[str] = []

    async def drive(client: Client, seed: int) -> None:
        nonlocal current
        local = random.Random(seed)
        await asyncio.sleep(local.uniform(0, args.think_ms / 1000))  # spread the starts
        while time.monotonic() < end:
            chunk = chunks[local.randrange(len(chunks))]
            sent = time.perf_counter()
            try:
                await client.step(chunk)
                current.latencies.append(time.perf_counter() - sent)
            except (StepFailed, OSError, asyncio.IncompleteReadError) as e:
                current.errors.append(str(e)[:200])
                return  # the session's step count is unknown now: stop it, the error is counted
            await asyncio.sleep(local.expovariate(1000 / args.think_ms))

    async def sample() -> None:
        nonlocal current
        while time.monotonic() < end:
            await asyncio.sleep(min(args.window, max(0.0, end - time.monotonic())))
            window, current = current, Window()
            error_samples.extend(window.errors[: 5 - len(error_samples)])
            windows.append(window.summary(time.monotonic() - start, rss_bytes(pid)))
            print(json.dumps(windows[-1]), file=sys.stderr)

    await asyncio.gather(sample(), *(drive(c, i) for i, c in enumerate(clients)))
    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
    return verdict(args, windows, error_samples)


def verdict(args: argparse.Namespace, windows: list[dict[str, Any]], error_samples: list[str]) -> dict[str, Any]:
    base = windows[1] if len(windows) > 1 else windows[0]  # the end of the warm-up window
    last = windows[-1]
    growth = (last["rss_mib"] - base["rss_mib"]) / base["rss_mib"]
    drift = last["p99_ms"] / base["p99_ms"] if base["p99_ms"] else 1.0
    errors = sum(w["errors"] for w in windows)
    return {
        "minutes": args.minutes,
        "sessions": args.sessions,
        "transports": list(TRANSPORTS),
        "think_ms": args.think_ms,
        "requests": sum(w["requests"] for w in windows),
        "errors": errors,
        "error_samples": error_samples,
        "rss_base_mib": base["rss_mib"],
        "rss_last_mib": last["rss_mib"],
        "rss_max_mib": max(w["rss_mib"] for w in windows),
        "rss_growth_pct": round(100 * growth, 2),
        "p99_base_ms": base["p99_ms"],
        "p99_last_ms": last["p99_ms"],
        "p99_drift": round(drift, 2),
        "passed": growth < MAX_RSS_GROWTH and errors == 0 and drift < MAX_P99_DRIFT,
        "windows": windows,
    }


def plot(result: dict[str, Any], target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [w["t_s"] for w in result["windows"]]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    top.plot(t, [w["rss_mib"] for w in result["windows"]], marker="o")
    top.set_ylabel("server RSS (MiB)")
    top.set_title(f"soak: {result['sessions']} sessions, {result['minutes']} min, mixed HTTP / WebSocket")
    bottom.plot(t, [w["p99_ms"] for w in result["windows"]], marker="o", label="p99")
    bottom.plot(t, [w["p50_ms"] for w in result["windows"]], marker=".", label="p50")
    bottom.set_ylabel("latency (ms)")
    bottom.set_xlabel("time (s)")
    bottom.legend()
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    plt.close(fig)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with redis(Path(tempfile.mkdtemp(prefix="carryover-soak-"))) as store:
        extra = ("--max-sessions", str(max(10 * args.sessions, 1000)))
        with carryover(store.url, *extra) as server:
            assert server.pid is not None
            return await soak(server.url, server.pid, args)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--sessions", type=int, default=1000)
    p.add_argument("--think-ms", type=float, default=200.0, help="mean pause between a session's chunks")
    p.add_argument("--window", type=float, default=10.0, help="seconds per measurement window")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "soak.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in result.items() if k != "windows"}, indent=2))
    if not result["passed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
