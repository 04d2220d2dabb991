"""Length bucketing: split one gathered batch into model calls so padding stays cheap.

Rows are sorted by length and cut into contiguous groups, minimising
``sum(rows_in_group * longest_in_group) + overhead * groups`` exactly (a small dynamic
programme, n <= max_batch_size). ``overhead`` is what one extra model call costs, in padded
cells; 0 means "never pad", a huge value means "always one call".
"""

from __future__ import annotations


def plan_buckets(lengths: list[int], overhead: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into model calls (each group sorted by length)."""
    if lengths and min(lengths) == max(lengths):  # nothing to pad (e.g. every row one token): one call
        return [list(range(len(lengths)))]
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[j]: cost of the first j sorted rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = lengths[order[j - 1]]
        for i in range(j):  # group = sorted rows i..j-1, padded to the longest (the last)
            cost = best[i] + (j - i) * longest + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups: list[list[int]] = []
    j = n
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


def padding_ratio(lengths: list[int]) -> float:
    """Share of the ``B x max(T)`` cells of one call that are padding."""
    cells = len(lengths) * max(lengths)
    return 1.0 - sum(lengths) / cells if cells else 0.0
