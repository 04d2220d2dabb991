"""The CUDA path on a machine with a GPU: the invariant against CPU, IO binding, batched vs B = 1.

    python -m bench.gpu [--out bench/results/gpu.json] [--seconds 2]

For the bundled LM and a GRU with hidden 1024 (exported here with torch, both forms):

1. **Invariant**: random ragged batches (per-row lengths, padding masked) run with the CUDA
   provider and with the CPU provider; outputs and final states must agree within 1e-3.
2. **IO binding**: the step-form model run through ``RecurrentModel`` on CUDA binds its inputs and
   outputs on the device (``model.py``); reported as whether it was used, and checked like (1).
3. **Matrix**: steps/s of one padded ``[B, T]`` call vs B calls at B = 1, for B in {1, 16, 64,
   256} and T in {1, 16}, on CUDA (and CPU for reference).

Exits 1 if no CUDA provider is available or an invariant check fails. Not run on the 2-core
development machine (no GPU there); see docs/bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from service.config import BUNDLED_MODEL
from service.engine.model import RecurrentModel

TOLERANCE = 1e-3


def gru_1024(directory: Path) -> Path:
    """A token GRU with hidden 1024 (2 layers), exported in step form (needs torch)."""
    from model_export.cells import RecurrentNet
    from model_export.export import export_cell

    vocab = "".join(chr(32 + i) for i in range(96))
    net = RecurrentNet(
        "gru", hidden_size=1024, num_layers=2, vocab_size=96, embedding_dim=64, output_size=96, vocab=vocab, unk_id=0
    )
    return export_cell(net.eval(), directory / "gru1024.onnx", form="step")


def random_batch(model: RecurrentModel, batch: int, steps: int, rng: np.random.Generator) -> tuple[Any, ...]:
    """Padded inputs ``[B, T, ...]``, a mask with random per-row lengths (>= 1) and random states."""
    c = model.contract
    inputs = {}
    for t in c.inputs:
        shape = (batch, steps, *t.shape)
        if np.issubdtype(t.dtype, np.integer):
            inputs[t.name] = rng.integers(0, len(c.vocab) if c.vocab else 2, shape).astype(t.dtype)
        else:
            inputs[t.name] = rng.standard_normal(shape).astype(t.dtype)
    lengths = rng.integers(1, steps + 1, batch)
    mask = np.arange(steps)[None, :] < lengths[:, None]
    states = {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in c.initial_states(batch).items()}
    return inputs, mask, states


def invariant(cpu: RecurrentModel, gpu: RecurrentModel, rng: np.random.Generator) -> float:
    """Largest |CUDA - CPU| over outputs and states of random ragged batches."""
    worst = 0.0
    for batch, steps in ((1, 1), (7, 5), (64, 16), (3, 33)):
        inputs, mask, states = random_batch(cpu, batch, steps, rng)
        a, b = cpu.run(inputs, mask, states), gpu.run(inputs, mask, states)
        pairs = [*zip(a.outputs.values(), b.outputs.values(), strict=True)]
        pairs += zip(a.states.values(), b.states.values(), strict=True)
        for x, y in pairs:
            worst = max(worst, float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))))
    return worst


def steps_per_s(model: RecurrentModel, batch: int, steps: int, seconds: float, rng: np.random.Generator) -> float:
    """Timesteps per second of back-to-back ``[batch, steps]`` calls (all rows full)."""
    inputs, _, states = random_batch(model, batch, steps, rng)
    mask = np.ones((batch, steps), bool)
    model.run(inputs, mask, states)  # warm-up
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        model.run(inputs, mask, states)
        n += 1
    return n * batch * steps / (time.perf_counter() - start)


def matrix(model: RecurrentModel, seconds: float, rng: np.random.Generator) -> list[dict[str, Any]]:
    rows = []
    for steps in (1, 16):
        single = steps_per_s(model, 1, steps, seconds, rng)
        for batch in (1, 16, 64, 256):
            batched = steps_per_s(model, batch, steps, seconds, rng)
            rows.append({"B": batch, "T": steps, "batched_steps_per_s": batched, "b1_steps_per_s": single})
            print(f"  B={batch:4d} T={steps:2d}: {batched:12,.0f} steps/s batched, {single:10,.0f} at B=1", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the three checks for both models; write the JSON; 1 on no CUDA or a failed invariant."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench/results/gpu.json"))
    p.add_argument("--seconds", type=float, default=2.0, help="per matrix point")
    args = p.parse_args(argv)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        print(f"no CUDA provider in this onnxruntime ({ort.get_available_providers()}): nothing to run")
        return 1
    rng = np.random.default_rng(0)
    results: dict[str, Any] = {"device": ort.get_device(), "onnxruntime": ort.__version__, "models": {}}
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in (("charlm", BUNDLED_MODEL), ("gru1024", gru_1024(Path(tmp)))):
            cpu = RecurrentModel(path, name=name, providers=["cpu"])
            gpu = RecurrentModel(path, name=name, providers=["cuda"])
            if gpu.device != "cuda":  # onnxruntime-gpu lists CUDA even where it cannot load it
                print(f"{name}: the CUDA provider did not load (runs on {gpu.provider}): nothing to measure")
                return 1
            worst = invariant(cpu, gpu, rng)
            ok &= worst <= TOLERANCE
            bound = gpu.device == "cuda"  # every call is IO-bound; on CUDA its outputs stay on the device
            verdict = "ok" if worst <= TOLERANCE else "FAIL"
            print(f"{name}: max |CUDA - CPU| = {worst:.2e} ({verdict}); outputs bound on the device: {bound}")
            results["models"][name] = {
                "max_abs_diff": worst,
                "io_binding": bound,
                "cuda": matrix(gpu, args.seconds, rng),
                "cpu": matrix(cpu, args.seconds / 2, rng),
            }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"written {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
