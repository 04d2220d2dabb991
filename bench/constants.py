"""Per-session constants: what a memory costs the engine (the attention decoder of
``model_export/examples/attention_decoder.py``, committed under ``tests/data/models/``).

    python -m bench.constants [--sessions 64] [--requests 16] [--steps 8]

N sessions, each created with its own memory (``[L, 10]`` float32), send R requests of S tokens
at once through the real engine (real Redis: an embedded redis-server in a temp dir, or
``--redis-url``; the real scheduler, batch assembly and ORT). Three memory layouts: every
session L = 16, ragged L in 1..31 (mean 16, so each batch pads its memories to about its
longest), and every session L = 64. Reported: timesteps/s, the share of memory positions in
model calls that are padding, and the Redis bytes of one session's record. Writes
``bench/results/constants.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import redis

from service.config import Settings
from service.engine.model import RecurrentModel
from service.sessions import SessionService
from service.store.embedded import redis_or_embedded
from service.store.record import session_key
from service.store.store import SessionStore

RESULTS = Path(__file__).parent / "results"
MODEL = Path(__file__).resolve().parents[1] / "tests" / "data" / "models" / "attention_decoder.onnx"
LAYOUTS = {"L = 16 (all)": (16, 16), "L in 1..31 (ragged)": (1, 31), "L = 64 (all)": (64, 64)}


async def run(
    model: RecurrentModel, url: str, lengths: tuple[int, int], args: argparse.Namespace, tmp: Path
) -> dict[str, Any]:
    store = await SessionStore.connect(url)
    service = SessionService(Settings(data_dir=tmp, max_batch_size=args.sessions), store, {"attn": model})
    await service.start()
    rng = np.random.default_rng(0)
    sizes = rng.integers(lengths[0], lengths[1] + 1, args.sessions)
    ids = [(await service.create(constants={"memory": rng.standard_normal((n, 10))})).session_id for n in sizes]
    padded = [0, 0]  # memory positions in model calls: (real, all)
    scheduler = service.schedulers["attn"]
    original = scheduler._run_model

    async def counting(rows: list[Any]) -> None:  # the memory cells each model call carries
        real = [r.constants["memory"].shape[0] for r in rows]  # equal step counts: one call per batch
        padded[0] += sum(real)
        padded[1] += len(real) * max(real)
        await original(rows)

    scheduler._run_model = counting  # type: ignore[method-assign]

    async def one(sid: str) -> None:
        for _ in range(args.requests):
            await service.step(sid, {"tokens": rng.integers(0, 11, args.steps)})

    started = time.perf_counter()
    await asyncio.gather(*(one(sid) for sid in ids))
    elapsed = time.perf_counter() - started
    await service.stop()
    await store.close()
    with redis.Redis.from_url(url) as r:
        record = sum(len(v) for v in r.hgetall(session_key(ids[0])).values())
    return {
        "timesteps_per_s": round(args.sessions * args.requests * args.steps / elapsed),
        "memory_padding": round(1 - padded[0] / padded[1], 3),
        "record_bytes_first_session": record,
        "first_session_length": int(sizes[0]),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    model = RecurrentModel(MODEL, name="attn", intra_op_threads=args.threads)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="carryover-bench-") as tmp:
        async with redis_or_embedded(args.redis_url, Path(tmp)) as url:
            for name, lengths in LAYOUTS.items():
                runs[name] = await run(model, url, lengths, args, Path(tmp))
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {model.provider}, {args.threads} ORT thread(s)",
        "sessions": args.sessions,
        "requests": args.requests,
        "steps": args.steps,
        "runs": runs,
    }


def write(result: dict[str, Any], results: Path = RESULTS) -> None:
    results.mkdir(parents=True, exist_ok=True)
    (results / "constants.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"Attention decoder (memory [L, 10]), {result['sessions']} sessions x {result['requests']} requests x "
        f"{result['steps']} tokens, all at once; {result['machine']}.",
        "",
        "| memory lengths | timesteps/s | padded memory positions | one record in Redis (bytes, its L) |",
        "|---|---|---|---|",
    ]
    for name, r in result["runs"].items():
        lines.append(
            f"| {name} | {r['timesteps_per_s']:,} | {r['memory_padding']:.0%} "
            f"| {r['record_bytes_first_session']:,} (L = {r['first_session_length']}) |"
        )
    (results / "constants.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--sessions", type=int, default=64)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="ORT intra-op threads")
    p.add_argument("--redis-url", default=None, help="default: an embedded redis-server in a temp dir")
    args = p.parse_args(argv)
    result = asyncio.run(main_async(args))
    write(result, args.results)
    print((args.results / "constants.md").read_text())


if __name__ == "__main__":
    main()
