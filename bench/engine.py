"""In-process engine throughput: batching on vs off, and vs raw ONNX Runtime (the ceiling).

    python -m bench.engine [--sessions 256] [--requests 8] [--steps 8]

256 sessions step concurrently (closed loop: each sends its next request when the previous one
is answered) through the real engine: a real Redis (an embedded redis-server in a temp dir),
the real scheduler and the bundled char LM. Runs: batching on (``max_batch_size=64``) and off
(``max_batch_size=1``). The ceiling replays the exact (B, T) shapes the batching run executed
straight into ``RecurrentModel.run``: no Redis, no asyncio. The engine runs on uvloop, as in
``carryover serve`` (``--asyncio-loop``: the stdlib loop). All numbers come from one run on
the same machine, so the ratios are what matter on a shared, noisy box; the ceiling is the
mean of one measurement right before the batching run and one right after it.
Writes ``bench/results/engine.json`` and ``bench/results/engine.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from service.config import BUNDLED_MODEL, Settings
from service.engine.model import RecurrentModel
from service.sessions import SessionService
from service.store.embedded import redis_or_embedded
from service.store.store import SessionStore

RESULTS = Path(__file__).parent / "results"
_T = TypeVar("_T")


async def engine_run(
    model: RecurrentModel,
    store: SessionStore,
    sessions: int,
    requests: int,
    steps: int,
    ragged: bool = False,
    **settings: Any,
) -> dict[str, Any]:
    """``ragged``: each request has a random length in [1, steps] instead of exactly ``steps``."""
    service = SessionService(Settings(**settings), store, {"lm": model})
    await service.start()
    rng = np.random.default_rng(0)
    vocab = len(model.contract.vocab or ())
    ids = [(await service.create()).session_id for _ in range(sessions)]
    payloads = [
        [rng.integers(0, vocab, size=int(rng.integers(1, steps + 1)) if ragged else steps) for _ in range(requests)]
        for _ in ids
    ]

    async def drive(sid: str, tokens: list[np.ndarray]) -> None:
        step = 0
        for row in tokens:  # with `step`, as the client sends it: replay records are written too
            step = (await service.step(sid, {"tokens": row}, expected_step=step)).step

    trips_before = store.round_trips
    started = time.perf_counter()
    await asyncio.gather(*(drive(s, p) for s, p in zip(ids, payloads, strict=True)))
    elapsed = time.perf_counter() - started
    scheduler = service.schedulers["lm"]
    shapes = list(scheduler.call_shapes)
    batches = scheduler.batches
    await service.stop()
    total = sum(len(row) for rows in payloads for row in rows)
    cells = sum(b * t for b, t in shapes)
    return {
        "steps_per_s": total / elapsed,
        "padding": 1 - total / cells if cells else 0.0,
        "seconds": elapsed,
        "timesteps": total,
        "model_calls": len(shapes),
        "batches": batches,
        "mean_rows": float(np.mean([b for b, _ in shapes])),
        "redis_round_trips_per_batch": (store.round_trips - trips_before) / max(batches, 1),
        "shapes": shapes,
    }


def raw_run(model: RecurrentModel, shapes: list[tuple[int, int]]) -> dict[str, Any]:
    """The ceiling: the same (B, T) batches straight into the runtime, nothing around them."""
    rng = np.random.default_rng(1)
    vocab = len(model.contract.vocab or ())
    name = model.contract.inputs[0].name
    prepared = [
        ({name: rng.integers(0, vocab, size=(b, t))}, np.ones((b, t), bool), model.contract.initial_states(b))
        for b, t in shapes
    ]
    started = time.perf_counter()
    for inputs, mask, states in prepared:
        model.run(inputs, mask, states)
    elapsed = time.perf_counter() - started
    return {"steps_per_s": sum(b * t for b, t in shapes) / elapsed, "seconds": elapsed}


async def measure(model: RecurrentModel, args: argparse.Namespace, steps: int) -> dict[str, Any]:
    """Batching on (``args.repeats`` times, each between two measurements of the ceiling on its
    own shapes) and off (once); the reported run is the one with the median engine / raw ratio."""
    with tempfile.TemporaryDirectory(prefix="carryover-bench-") as tmp:
        async with redis_or_embedded(args.redis_url, Path(tmp)) as redis_url:
            store = await SessionStore.connect(redis_url)
            try:
                common: dict[str, Any] = {"data_dir": Path(tmp), "max_wait_us": 2000}
                # A rehearsal gives the shapes the batching run will execute, so that the ceiling
                # can be measured right before and right after it: this box's speed drifts by
                # a quarter from one minute to the next, and the ratio is what is reported.
                rehearsal = await engine_run(model, store, args.sessions, 4, steps, max_batch_size=64, **common)
                repeats = []
                for _ in range(args.repeats):
                    before = raw_run(model, rehearsal["shapes"] * max(1, args.requests // 4))
                    batched = await engine_run(
                        model, store, args.sessions, args.requests, steps, max_batch_size=64, **common
                    )
                    after = raw_run(model, batched["shapes"])
                    raw = (before["steps_per_s"] + after["steps_per_s"]) / 2
                    repeats.append((batched["steps_per_s"] / raw, batched, before, after, raw))
                single = await engine_run(
                    model, store, args.sessions, max(1, args.requests // 4), steps, max_batch_size=1, **common
                )
            finally:
                await store.close()
    repeats.sort(key=lambda r: r[0])
    ratio, batched, before, after, raw_steps_per_s = repeats[len(repeats) // 2]
    return {
        "steps_per_request": steps,
        "batched_steps_per_s": round(batched["steps_per_s"]),
        "unbatched_steps_per_s": round(single["steps_per_s"]),
        "raw_ort_steps_per_s": round(raw_steps_per_s),
        "raw_ort_before_after": [round(before["steps_per_s"]), round(after["steps_per_s"])],
        "batching_speedup": round(batched["steps_per_s"] / single["steps_per_s"], 2),
        "engine_vs_raw": round(ratio, 3),
        "engine_vs_raw_repeats": [round(r[0], 3) for r in repeats],
        "mean_rows_per_call": round(batched["mean_rows"], 1),
        "redis_round_trips_per_batch": round(batched["redis_round_trips_per_batch"], 2),
        "redis_round_trips_per_batch_unbatched": round(single["redis_round_trips_per_batch"], 2),
    }


async def measure_bucketing(model: RecurrentModel, args: argparse.Namespace, longest: int) -> dict[str, Any]:
    """Ragged request lengths (1..longest): length buckets on (default) vs one call per batch."""
    out: dict[str, Any] = {"request_steps": f"1..{longest}"}
    with tempfile.TemporaryDirectory(prefix="carryover-bench-") as tmp:
        async with redis_or_embedded(args.redis_url, Path(tmp)) as redis_url:
            store = await SessionStore.connect(redis_url)
            try:
                for label, overhead in (("buckets", Settings().bucket_overhead_tokens), ("one_call", 10**9)):
                    run = await engine_run(
                        model,
                        store,
                        args.sessions,
                        args.requests,
                        longest,
                        ragged=True,
                        data_dir=Path(tmp),
                        bucket_overhead_tokens=overhead,
                    )
                    out[label] = {
                        "steps_per_s": round(run["steps_per_s"]),
                        "padding": round(run["padding"], 3),
                        "model_calls": run["model_calls"],
                    }
            finally:
                await store.close()
    return out


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    model = RecurrentModel(args.model, name="lm", intra_op_threads=args.threads)
    runs = [await measure(model, args, steps) for steps in args.steps]
    bucketing = await measure_bucketing(model, args, args.ragged)
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {model.provider}, "
        f"{args.threads or 'default'} ORT intra-op thread(s)",
        "model": f"bundled char LM ({Path(args.model).name})",
        "sessions": args.sessions,
        "requests_per_session": args.requests,
        "runs": runs,
        "bucketing": bucketing,
    }


def write(result: dict[str, Any], results: Path = RESULTS) -> None:
    results.mkdir(parents=True, exist_ok=True)
    (results / "engine.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"{result['sessions']} sessions × {result['requests_per_session']} requests, {result['model']}; "
        f"{result['machine']}.",
        "",
        "| steps/request | batching on (64 rows) | batching off (1 row) | raw ORT, same shapes | batching speed-up "
        "| engine / raw (median; each run) | Redis round trips / batch |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        lines.append(
            f"| {r['steps_per_request']} | {r['batched_steps_per_s']:,} | {r['unbatched_steps_per_s']:,} "
            f"| {r['raw_ort_steps_per_s']:,} | **{r['batching_speedup']}×** | **{r['engine_vs_raw']:.0%}** "
            f"({', '.join(f'{x:.0%}' for x in r['engine_vs_raw_repeats'])}) "
            f"| {r['redis_round_trips_per_batch']} |"
        )
    lines.append("")
    lines.append(
        "Timesteps per second. Goals: batching ≥ 8× off, engine ≥ 70 % of raw ORT. Each batching run sits "
        "between two measurements of raw ORT on its own shapes (the ceiling is their mean); the row shows "
        "the run with the median ratio."
    )
    b = result["bucketing"]
    lines += [
        "",
        f"Length bucketing, request lengths uniform in {b['request_steps']}:",
        "",
        "| batches run as | timesteps/s | padded share of cells | model calls |",
        "|---|---|---|---|",
        f"| length buckets (default) | {b['buckets']['steps_per_s']:,} | {b['buckets']['padding']:.0%} "
        f"| {b['buckets']['model_calls']} |",
        f"| one call per batch | {b['one_call']['steps_per_s']:,} | {b['one_call']['padding']:.0%} "
        f"| {b['one_call']['model_calls']} |",
    ]
    (results / "engine.md").write_text("\n".join(lines) + "\n")


def run_loop(main: Coroutine[Any, Any, _T], *, uvloop: bool = True) -> _T:
    """Run ``main`` on uvloop where it is installed (what ``carryover serve`` runs on: uvicorn
    picks it), else on the stdlib loop; the stdlib loop's own overhead per batch is larger."""
    if uvloop:
        try:
            import uvloop as fast
        except ImportError:  # uvicorn[standard] installs it on Linux and macOS only
            pass
        else:
            return fast.run(main)
    return asyncio.run(main)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=RESULTS, help="where the JSON, table and plot go")
    p.add_argument("--sessions", type=int, default=256)
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--steps", type=int, nargs="+", default=[8, 32, 128], help="steps per request (one run each)")
    p.add_argument("--ragged", type=int, default=128, help="longest request in the bucketing run")
    p.add_argument("--repeats", type=int, default=3, help="batching runs per step count (the median is reported)")
    p.add_argument("--threads", type=int, default=1, help="ORT intra-op threads, for the engine and the ceiling")
    p.add_argument("--model", default=str(BUNDLED_MODEL))
    p.add_argument("--redis-url", default=None, help="default: an embedded redis-server in a temp dir")
    p.add_argument("--asyncio-loop", action="store_true", help="the stdlib event loop instead of uvloop")
    args = p.parse_args(argv)
    result = run_loop(main_async(args), uvloop=not args.asyncio_loop)
    write(result, args.results)
    from bench.plots import plot_all

    plot_all(args.results)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
