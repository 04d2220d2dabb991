"""Generation throughput with continuous batching: tokens/s for N concurrent generations.

    python -m bench.generate [--concurrency 1 16 64 256] [--tokens 64] [--prompt 32]

N sessions each run one generation at once (``max_tokens`` tokens after a ``--prompt``-character
prompt, temperature 0.8, seeded) through the real engine: a real Redis (an embedded redis-server
in a temp dir, or ``--redis-url``), the real scheduler, the bundled char LM. Every generation
advances one token per scheduler iteration in the shared batch, and each iteration is written
(one compare-and-set per session per token). The baseline is the same N generations one at a
time (B = 1 throughout); the gain is the ratio of the two on the same machine in the same run.
Writes ``bench/results/generate.json`` and ``bench/results/generate.md``.
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

from service.config import BUNDLED_MODEL, Settings
from service.engine.model import RecurrentModel
from service.sessions import DoneEvent, GenerateCall, SessionService
from service.store.embedded import redis_or_embedded
from service.store.store import SessionStore

RESULTS = Path(__file__).parent / "results"


async def run(
    model: RecurrentModel, store: SessionStore, n: int, args: argparse.Namespace, *, concurrent: bool, tmp: Path
) -> dict[str, Any]:
    """``n`` generations, all at once (``concurrent``) or one after another; tokens/s."""
    settings = Settings(data_dir=tmp, max_batch_size=args.max_batch_size, max_generate_tokens=max(args.tokens, 1))
    service = SessionService(settings, store, {"lm": model})
    await service.start()
    vocab = model.contract.vocab or ()
    rng = np.random.default_rng(0)
    prompts = ["".join(vocab[i] for i in rng.integers(1, len(vocab), args.prompt)) for _ in range(n)]
    ids = [(await service.create()).session_id for _ in range(n)]
    scheduler = service.schedulers["lm"]
    rows_before = len(scheduler.generation_rows)

    async def one(sid: str, prompt: str, seed: int) -> int:
        call = GenerateCall(prompt, max_tokens=args.tokens, temperature=0.8, seed=seed)
        async for event in await service.generate(sid, call):
            if isinstance(event, DoneEvent):
                return len(event.tokens)
        return 0

    started = time.perf_counter()
    if concurrent:
        counts = await asyncio.gather(*(one(sid, p, i) for i, (sid, p) in enumerate(zip(ids, prompts, strict=True))))
    else:
        counts = [await one(sid, p, i) for i, (sid, p) in enumerate(zip(ids, prompts, strict=True))]
    elapsed = time.perf_counter() - started
    rows = [r for r in list(scheduler.generation_rows)[rows_before:] if r]
    await service.stop()
    return {
        "tokens": sum(counts),
        "seconds": round(elapsed, 3),
        "tokens_per_s": sum(counts) / elapsed,
        "mean_generation_rows_per_batch": float(np.mean(rows)) if rows else 0.0,
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    model = RecurrentModel(args.model, name="lm", intra_op_threads=args.threads)
    runs = []
    with tempfile.TemporaryDirectory(prefix="carryover-bench-") as tmp:
        async with redis_or_embedded(args.redis_url, Path(tmp)) as redis_url:
            store = await SessionStore.connect(redis_url)
            try:
                for n in args.concurrency:
                    together = await run(model, store, n, args, concurrent=True, tmp=Path(tmp))
                    # One at a time: fewer generations suffice for a steady rate (tokens/s is per token).
                    alone = await run(model, store, min(n, args.baseline), args, concurrent=False, tmp=Path(tmp))
                    runs.append(
                        {
                            "concurrent": n,
                            "tokens_per_s": round(together["tokens_per_s"]),
                            "one_at_a_time_tokens_per_s": round(alone["tokens_per_s"]),
                            "gain": round(together["tokens_per_s"] / alone["tokens_per_s"], 2),
                            "mean_generation_rows_per_batch": round(together["mean_generation_rows_per_batch"], 1),
                            "seconds": together["seconds"],
                        }
                    )
            finally:
                await store.close()
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {model.provider}, "
        f"{args.threads or 'default'} ORT intra-op thread(s)",
        "model": f"bundled char LM ({Path(args.model).name})",
        "tokens_per_generation": args.tokens,
        "prompt_chars": args.prompt,
        "max_batch_size": args.max_batch_size,
        "runs": runs,
    }


def write(result: dict[str, Any], results: Path = RESULTS) -> None:
    results.mkdir(parents=True, exist_ok=True)
    (results / "generate.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"Generation, {result['tokens_per_generation']} tokens after a {result['prompt_chars']}-character prompt, "
        f"{result['model']}, max_batch_size {result['max_batch_size']}; {result['machine']}.",
        "",
        "| concurrent generations | tokens/s | one at a time, tokens/s | gain | generation rows / batch |",
        "|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        lines.append(
            f"| {r['concurrent']} | {r['tokens_per_s']:,} | {r['one_at_a_time_tokens_per_s']:,} "
            f"| **{r['gain']}×** | {r['mean_generation_rows_per_batch']} |"
        )
    lines += ["", "Every token is written to Redis (one compare-and-set per session per iteration)."]
    (results / "generate.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=RESULTS, help="where the JSON and the table go")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    p.add_argument("--tokens", type=int, default=64, help="tokens per generation")
    p.add_argument("--prompt", type=int, default=32, help="prompt length in characters")
    p.add_argument("--baseline", type=int, default=16, help="generations in the one-at-a-time run (at most N)")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="ORT intra-op threads")
    p.add_argument("--model", default=str(BUNDLED_MODEL))
    p.add_argument("--redis-url", default=None, help="default: an embedded redis-server in a temp dir")
    args = p.parse_args(argv)
    result = asyncio.run(main_async(args))
    write(result, args.results)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
