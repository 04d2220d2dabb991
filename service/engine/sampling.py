"""Next-token sampling, vectorised over the rows of a batch (pure numpy, no state).

Each row has its own temperature (0 = greedy), ``top_k`` (0 = off) and ``top_p`` (1 = off); the
randomness comes in as one uniform draw per row from that row's own seeded generator, so a
row's token depends only on its logits, its parameters and its generator: never on which other
rows share the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    """How one generation picks its tokens (already validated by ``service.sessions``)."""

    temperature: float = 0.0  # 0 = greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens; 0 = all
    top_p: float = 1.0  # keep the smallest set whose probability reaches top_p; 1 = all


def sample(
    logits: np.ndarray, temperature: np.ndarray, top_k: np.ndarray, top_p: np.ndarray, uniforms: np.ndarray
) -> np.ndarray:
    """One token id per row of ``logits`` ``[G, V]``; the other arguments are ``[G]``.

    Greedy rows take the argmax (the lowest id on a tie, like ``np.argmax``). Other rows: softmax
    of ``logits / temperature``, cut to the ``top_k`` most likely, renormalised, cut to the
    nucleus ``top_p`` (a token stays while the mass of the tokens before it is below ``top_p``),
    then the inverse CDF at ``uniforms`` (in ``[0, 1)``)."""
    scores = np.asarray(logits, np.float64)
    rows, vocab = scores.shape
    greedy = np.asarray(temperature) <= 0
    scaled = scores / np.where(greedy, 1.0, temperature)[:, None]
    order = np.argsort(-scaled, axis=1, kind="stable")  # most likely first; ties: lower id first
    ranked = np.take_along_axis(scaled, order, axis=1)
    probs = np.exp(ranked - ranked[:, :1])
    k = np.where(np.asarray(top_k) > 0, np.minimum(top_k, vocab), vocab)
    probs *= np.arange(vocab)[None, :] < k[:, None]
    probs /= probs.sum(axis=1, keepdims=True)
    before = np.cumsum(probs, axis=1) - probs
    keep = before < np.asarray(top_p)[:, None]
    keep[:, 0] = True
    cdf = np.cumsum(np.where(keep, probs, 0.0), axis=1)
    target = np.asarray(uniforms, np.float64) * cdf[:, -1]
    index = np.minimum((cdf <= target[:, None]).sum(axis=1), vocab - 1)
    chosen = order[np.arange(rows), index]
    return np.where(greedy, order[:, 0], chosen).astype(np.int64)
