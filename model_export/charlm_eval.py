"""Bits per character of a served token LM on held-out text, measured through the runtime
(``RecurrentModel.run``, the same code path the service uses), not through PyTorch.

    python -m model_export.charlm_eval [MODEL.onnx] [--max-chars N] [--third-party PACKAGE]

``--third-party pydantic`` scores the ``*.py`` files of an installed package instead of the
held-out standard library: code by other authors, in other styles, that the model never saw.
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from model_export.charlm_data import encode, package_files, read_text, split_stdlib
from service.config import BUNDLED_MODEL
from service.engine.model import RecurrentModel


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    out: np.ndarray = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return out


def bits_per_char(model: RecurrentModel, ids: np.ndarray, streams: int = 16, window: int = 256) -> float:
    """Score ``ids`` as ``streams`` contiguous rows, carrying state across windows."""
    assert model.contract.kind == "token_lm"
    name = model.contract.inputs[0].name
    logits_name = model.contract.outputs[0].name
    per_row = len(ids) // streams
    rows = ids[: per_row * streams].reshape(streams, per_row)
    states = model.contract.initial_states(streams)
    total, count = 0.0, 0
    for start in range(0, per_row - 1, window):
        x = rows[:, start : start + window + 1]
        if x.shape[1] < 2:
            break
        result = model.run({name: x[:, :-1]}, np.ones((streams, x.shape[1] - 1), bool), states)
        states = result.states
        logp = log_softmax(result.outputs[logits_name].astype(np.float64))
        total -= float(np.take_along_axis(logp, x[:, 1:, None], axis=-1).sum())
        count += x[:, 1:].size
    return total / count / math.log(2)


def held_out_ids(model: RecurrentModel, max_chars: int | None = None, package: str | None = None) -> np.ndarray:
    """The held-out standard-library files, or an installed third-party ``package``'s files."""
    vocab = model.contract.vocab
    assert vocab is not None
    files = split_stdlib().held_out if package is None else package_files(package)
    return encode(read_text(files, max_chars), "".join(vocab))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=str(BUNDLED_MODEL))
    p.add_argument("--max-chars", type=int, default=None)
    p.add_argument("--third-party", metavar="PACKAGE", default=None, help="score an installed package's files")
    args = p.parse_args()
    model = RecurrentModel(args.model)
    ids = held_out_ids(model, args.max_chars, args.third_party)
    what = "held-out" if args.third_party is None else f"{args.third_party}"
    print(f"{bits_per_char(model, ids):.4f} bits/char over {len(ids):,} {what} characters")


if __name__ == "__main__":
    main()
