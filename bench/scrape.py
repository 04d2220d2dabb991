"""What a run did inside the server, from two scrapes of its ``/metrics`` (before and after).

``breakdown`` gives the per-stage mean time of one request's path through the service; a
stage whose histogram the service does not export (yet) is reported as ``not instrumented``
instead of a number. ``STAGES`` is the one place that maps stages to metric names.
"""

from __future__ import annotations

from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
NOT_INSTRUMENTED = "not instrumented"
# stage -> (histogram name, label filter). Names not exported today are the ones the service is
# expected to add; until it does, the stage reads "not instrumented".
STAGES: dict[str, tuple[str, dict[str, str]]] = {
    "queue_wait": ("carryover_queue_wait_seconds", {}),
    "redis_read": ("carryover_redis_seconds", {"op": "load"}),
    "model_run": ("carryover_model_run_seconds", {}),
    "redis_write": ("carryover_redis_seconds", {"op": "save"}),
    "serialisation": ("carryover_serialization_seconds", {}),
}
BATCH_ROWS = "carryover_batch_rows"


async def scrape(url: str) -> Samples | None:
    """Every sample of ``url``/metrics, or None when the server has no metrics (the naive one)."""
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            reply = await http.get(url + "/metrics")
    except httpx.TransportError:
        return None
    if reply.status_code != 200:
        return None
    samples: Samples = {}
    for family in text_string_to_metric_families(reply.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return samples


def delta(before: Samples, after: Samples) -> Samples:
    """``after - before`` for every sample in ``after`` (counters and histograms grow)."""
    return {key: value - before.get(key, 0.0) for key, value in after.items()}


def _total(samples: Samples, name: str, labels: dict[str, str]) -> float | None:
    """Sum of ``name`` over the series matching ``labels``; None if no such series exists."""
    found = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls)]
    return sum(found) if found else None


def breakdown(samples: Samples) -> dict[str, Any]:
    """Per stage: mean ms per observation and the number of observations, or not instrumented."""
    out: dict[str, Any] = {}
    for stage, (name, labels) in STAGES.items():
        count = _total(samples, name + "_count", labels)
        total = _total(samples, name + "_sum", labels)
        if count is None or total is None:
            out[stage] = {"metric": name, "status": NOT_INSTRUMENTED}
        else:
            mean = 1000 * total / count if count else None
            out[stage] = {"metric": name, "labels": labels, "mean_ms": mean, "count": int(count)}
    return out


def batch_rows(samples: Samples) -> dict[str, Any] | None:
    """The distribution of rows (sessions) per model call: counts per histogram bucket."""
    buckets = sorted(
        (float(dict(labels)["le"]), value)
        for (name, labels), value in samples.items()
        if name == BATCH_ROWS + "_bucket"
    )
    if not buckets:
        return None
    merged: dict[float, float] = {}
    for le, value in buckets:  # several models: add their cumulative counts
        merged[le] = merged.get(le, 0.0) + value
    edges = sorted(merged)
    counts, previous = [], 0.0
    for le in edges:
        counts.append(int(merged[le] - previous))
        previous = merged[le]
    calls = _total(samples, BATCH_ROWS + "_count", {}) or 0.0
    rows = _total(samples, BATCH_ROWS + "_sum", {}) or 0.0
    return {
        "le": [e if e != float("inf") else "+Inf" for e in edges],
        "counts": counts,
        "model_calls": int(calls),
        "mean_rows": rows / calls if calls else None,
    }


def summarise(before: Samples | None, after: Samples | None) -> dict[str, Any] | None:
    """The ``metrics`` entry of a load-generator result (None for servers without metrics)."""
    if before is None or after is None:
        return None
    d = delta(before, after)
    return {"stages": breakdown(d), "batch_rows": batch_rows(d)}
