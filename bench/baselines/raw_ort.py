"""The ceiling: the bundled model run straight through ``RecurrentModel.run`` on a fixed
(B, T) batch shape, back to back for a bounded time. No Redis, no HTTP, no asyncio.

    python -m bench.baselines.raw_ort --batch 64 --steps 16 --seconds 2
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np

from service.config import BUNDLED_MODEL
from service.engine.model import RecurrentModel


def load(path: str = str(BUNDLED_MODEL), threads: int = 0) -> RecurrentModel:
    """The model as the service loads it (``threads``: ORT intra-op threads, 0 = ORT's choice)."""
    return RecurrentModel(path, name="raw", intra_op_threads=threads)


def measure(model: RecurrentModel, batch: int, steps: int, seconds: float) -> dict[str, Any]:
    """Timesteps/s of back-to-back calls at ``[batch, steps]`` (at least 3 calls)."""
    rng = np.random.default_rng(0)
    vocab = len(model.contract.vocab or ()) or 2
    name = model.contract.inputs[0].name
    inputs = {name: rng.integers(0, vocab, size=(batch, steps))}
    mask = np.ones((batch, steps), np.bool_)
    states = model.contract.initial_states(batch)
    model.run(inputs, mask, states)  # warm-up: the first call of a shape allocates
    calls, started = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - started < seconds:
        states = model.run(inputs, mask, states).states
        calls += 1
    elapsed = time.perf_counter() - started
    return {
        "batch": batch,
        "steps": steps,
        "calls": calls,
        "ms_per_call": round(1000 * elapsed / calls, 3),
        "steps_per_s": round(batch * steps * calls / elapsed, 1),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--steps", type=int, nargs="+", default=[1, 16])
    p.add_argument("--seconds", type=float, default=2.0, help="per shape")
    p.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0 = ORT's choice)")
    args = p.parse_args(argv)
    model = load(threads=args.threads)
    print(json.dumps([measure(model, b, t, args.seconds) for b in args.batch for t in args.steps], indent=2))


if __name__ == "__main__":
    main()
