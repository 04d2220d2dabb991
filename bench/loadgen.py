"""Load generator for any running server (carryover or the naive baseline).

    python -m bench.loadgen --url http://127.0.0.1:8000 --sessions 64 --chunk 1-16 \\
        --transport ws --duration 10 [--rate 2000 --arrival poisson] [--out result.json]

``--sessions`` sessions, each on its own connection with one request in flight, step the
bundled char LM with random tokens; each request's length comes from ``--chunk`` (``16``, a
range ``1-16`` or a choice ``1,4,16``). Closed loop (default): a session sends its next request
as soon as the last is answered. Open loop (``--rate``): requests arrive at a fixed total rate
(``--arrival fixed``) or as a Poisson process, each to a random session, and a request's latency
runs from its arrival, so time spent queued behind a slow reply counts (no coordinated
omission). Goodput is the rate of requests answered within ``--slo-ms``.

Results (JSON, printed and written to ``--out``): steps/s, requests/s, latency p50/p95/p99/max
and a CDF, errors, goodput, and the generator's own CPU use (100 = one core busy: near that,
the generator, not the server, is the bottleneck). With ``/metrics`` on the server the result
also holds the per-stage breakdown and the batch size distribution of the run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench import scrape
from bench.clients import TRANSPORTS, Chunk, Client, StepFailed, open_client

OPEN_LIMIT = 64  # connections being opened at once
MAX_ERROR_SAMPLES = 5
POOL = 512  # distinct payloads, encoded once
CDF_POINTS = (*range(0, 100), 99.5, 99.9, 100)


@dataclass(frozen=True)
class LoadConfig:
    url: str
    sessions: int = 16
    chunk: str = "1"
    transport: str = "http"
    duration_s: float = 10.0
    warmup_s: float = 1.0
    rate: float | None = None  # open loop: requests/s over all sessions
    arrival: str = "poisson"
    slo_ms: float = 50.0
    vocab: int = 90
    exactly_once: bool = False
    drain_s: float = 5.0  # open loop: how long queued arrivals may finish after the end
    seed: int = 0
    progress: bool = True
    metrics: bool = True


def chunk_sizes(spec: str) -> list[int]:
    """``"16"`` → [16]; ``"1-16"`` → 1..16; ``"1,4,16"`` → those (each equally likely)."""
    try:
        if "-" in spec:
            low, high = (int(x) for x in spec.split("-"))
            sizes = list(range(low, high + 1))
        else:
            sizes = [int(x) for x in spec.split(",")]
    except ValueError:
        raise ValueError(f"chunk spec {spec!r}: use N, A-B or A,B,C") from None
    if not sizes or min(sizes) < 1:
        raise ValueError(f"chunk spec {spec!r}: sizes must be >= 1")
    return sizes


def payloads(config: LoadConfig) -> list[Chunk]:
    rng = np.random.default_rng(config.seed)
    sizes = chunk_sizes(config.chunk)
    lengths = rng.choice(sizes, size=POOL)
    return [Chunk.of(rng.integers(0, config.vocab, size=int(n)).tolist()) for n in lengths]


class Recorder:
    """Latencies and counts of requests that arrived inside the measured window."""

    def __init__(self, window_start: float) -> None:
        self.window_start = window_start
        self.latencies: list[float] = []
        self.steps = 0
        self.errors = 0
        self.samples: list[str] = []

    def done(self, arrived: float, steps: int) -> None:
        if arrived >= self.window_start:
            self.latencies.append(time.perf_counter() - arrived)
            self.steps += steps

    def failed(self, arrived: float, error: BaseException) -> None:
        if arrived >= self.window_start:
            self.errors += 1
            if len(self.samples) < MAX_ERROR_SAMPLES:
                self.samples.append(f"{type(error).__name__}: {error}"[:300])


class Session:
    """One session's worker: one request at a time, reconnecting after a transport failure."""

    def __init__(self, index: int, client: Client, config: LoadConfig, pool: list[Chunk], rec: Recorder) -> None:
        self.index, self.client, self.config, self.pool, self.rec = index, client, config, pool, rec
        self.sent = 0
        self.busy = False
        self.arrivals: asyncio.Queue[float] = asyncio.Queue()

    async def one(self, arrived: float) -> None:
        chunk = self.pool[(self.index * 7919 + self.sent) % len(self.pool)]
        self.sent += 1
        try:
            await self.client.step(chunk)
            self.rec.done(arrived, len(chunk.tokens))
        except StepFailed as e:
            self.rec.failed(arrived, e)
        except Exception as e:  # a broken connection (or protocol): count it, reconnect, go on
            self.rec.failed(arrived, e)
            await self.reconnect()

    async def reconnect(self) -> None:
        with contextlib.suppress(Exception):
            await self.client.close()
        try:
            self.client = await open_client(self.config.url, self.config.transport, self.config.exactly_once)
        except Exception:  # the server is down: back off, the next request retries
            await asyncio.sleep(0.1)

    async def closed_loop(self, end: float) -> None:
        while time.perf_counter() < end:
            await self.one(time.perf_counter())

    async def open_loop(self) -> None:
        while True:
            arrived = await self.arrivals.get()
            self.busy = True
            await self.one(arrived)
            self.busy = False


async def dispatch(sessions: list[Session], config: LoadConfig, start: float, window: float, end: float) -> int:
    """Open loop: put arrival times on random sessions' queues until ``end``; returns how many
    arrived from ``window`` on (the measured ones)."""
    assert config.rate
    rng = random.Random(config.seed)
    gap = 1.0 / config.rate
    next_at, measured = start, 0
    while next_at < end:
        now = time.perf_counter()
        while next_at <= now and next_at < end:  # catch up on every arrival already due
            sessions[rng.randrange(len(sessions))].arrivals.put_nowait(next_at)
            if next_at >= window:
                measured += 1
            next_at += rng.expovariate(config.rate) if config.arrival == "poisson" else gap
        await asyncio.sleep(max(0.0, min(next_at, end) - time.perf_counter()))
    return measured


async def _progress(config: LoadConfig, rec: Recorder, start: float, end: float) -> None:
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional (dev extra): run without a bar
        return
    total = end - start
    with tqdm(total=round(total, 1), unit="s", file=sys.stderr, leave=False, desc=config.transport) as bar:
        while (now := time.perf_counter()) < end:
            bar.n = round(min(now - start, total), 1)
            window = max(now - rec.window_start, 1e-9)
            bar.set_postfix(req_s=f"{len(rec.latencies) / window:.0f}", errors=rec.errors, refresh=True)
            await asyncio.sleep(0.5)


async def open_sessions(config: LoadConfig) -> list[Client]:
    limit = asyncio.Semaphore(OPEN_LIMIT)

    async def one() -> Client:
        async with limit:
            return await open_client(config.url, config.transport, config.exactly_once)

    return list(await asyncio.gather(*(one() for _ in range(config.sessions))))


async def run_load(config: LoadConfig) -> dict[str, Any]:
    """Run ``config`` against its server and return the result (see the module docstring)."""
    if config.transport not in TRANSPORTS:
        raise ValueError(f"unknown transport {config.transport!r}; choose from {TRANSPORTS}")
    pool = payloads(config)
    clients = await open_sessions(config)
    before = await scrape.scrape(config.url) if config.metrics else None
    start = time.perf_counter()
    rec = Recorder(start + config.warmup_s)
    end = rec.window_start + config.duration_s
    sessions = [Session(i, c, config, pool, rec) for i, c in enumerate(clients)]
    cpu_before = _cpu_seconds()
    bar = asyncio.create_task(_progress(config, rec, start, end)) if config.progress else None
    offered = None
    if config.rate is None:
        await asyncio.gather(*(s.closed_loop(end) for s in sessions))
    else:
        workers = [asyncio.create_task(s.open_loop()) for s in sessions]
        offered = await dispatch(sessions, config, start, rec.window_start, end)
        deadline = time.perf_counter() + config.drain_s
        while any(s.busy or not s.arrivals.empty() for s in sessions) and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0)  # let the last replies be recorded
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    cpu = _cpu_seconds() - cpu_before
    wall = time.perf_counter() - start
    if bar:
        bar.cancel()
        await asyncio.gather(bar, return_exceptions=True)
    after = await scrape.scrape(config.url) if config.metrics else None
    await asyncio.gather(*(s.client.close() for s in sessions), return_exceptions=True)
    result = summary(config, rec, offered)
    result["loadgen_cpu_percent"] = round(100 * cpu / wall, 1)
    result["metrics"] = scrape.summarise(before, after)
    return result


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def summary(config: LoadConfig, rec: Recorder, offered: int | None) -> dict[str, Any]:
    """The result JSON: the config, then rates, latency quantiles (ms) and errors. ``offered``:
    open loop, the arrivals in the measured window (those neither answered nor failed are
    ``unanswered``: still queued when the drain time ran out)."""
    lat = np.array(rec.latencies) * 1000 if rec.latencies else np.zeros(1)
    seconds = config.duration_s
    answered = len(rec.latencies)

    def q(p: float) -> float:
        return round(float(np.percentile(lat, p)), 3)

    within = int(np.count_nonzero(lat <= config.slo_ms)) if answered else 0
    return {
        "config": asdict(config),
        "requests": answered,
        "steps": rec.steps,
        "requests_per_s": round(answered / seconds, 1),
        "steps_per_s": round(rec.steps / seconds, 1),
        "p50_ms": q(50),
        "p95_ms": q(95),
        "p99_ms": q(99),
        "max_ms": q(100),
        "mean_ms": round(float(lat.mean()), 3),
        "errors": rec.errors,
        "error_samples": rec.samples,
        "slo_ms": config.slo_ms,
        "goodput_per_s": round(within / seconds, 1),
        "p99_within_slo": bool(answered and q(99) <= config.slo_ms),
        "offered_per_s": config.rate,
        "arrived": offered,  # open loop: arrivals in the measured window
        "unanswered": max(0, offered - answered - rec.errors) if offered is not None else 0,
        "latency_cdf_ms": [[p, q(p)] for p in CDF_POINTS] if answered else [],
    }


def parse_args(argv: list[str] | None) -> tuple[LoadConfig, Path | None]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--sessions", type=int, default=16, help="sessions (one connection each)")
    p.add_argument("--chunk", default="1", help="timesteps per request: N, A-B (uniform) or A,B,C (choice)")
    p.add_argument("--transport", choices=TRANSPORTS, default="http")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds (after the warm-up)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of load before measuring")
    p.add_argument("--rate", type=float, help="open loop: requests/s over all sessions (default: closed loop)")
    p.add_argument("--arrival", choices=("poisson", "fixed"), default="poisson", help="open loop arrivals")
    p.add_argument("--slo-ms", type=float, default=50.0, help="goodput counts requests answered within this")
    p.add_argument("--vocab", type=int, default=90, help="token ids are drawn from [0, vocab)")
    p.add_argument("--exactly-once", action="store_true", help="send `step` with every request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-metrics", action="store_true", help="do not scrape /metrics")
    p.add_argument("--out", type=Path, help="also write the result JSON here")
    a = p.parse_args(argv)
    config = LoadConfig(
        url=a.url.rstrip("/"),
        sessions=a.sessions,
        chunk=a.chunk,
        transport=a.transport,
        duration_s=a.duration,
        warmup_s=a.warmup,
        rate=a.rate,
        arrival=a.arrival,
        slo_ms=a.slo_ms,
        vocab=a.vocab,
        exactly_once=a.exactly_once,
        seed=a.seed,
        progress=not a.no_progress,
        metrics=not a.no_metrics,
    )
    chunk_sizes(config.chunk)  # fail fast on a bad spec
    return config, a.out


def main(argv: list[str] | None = None) -> None:
    config, out = parse_args(argv)
    result = asyncio.run(run_load(config))
    text = json.dumps(result, indent=2)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
