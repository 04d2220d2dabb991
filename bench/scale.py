"""Cost per request with a million idle sessions against the same with a thousand (issue 14).

Starts a private Redis (no persistence, ``rdbcompression no`` for ``populate``) and ``carryover
serve`` (the bundled LM), fills Redis with copies of one real session (``bench.populate``) and
measures at ``--baseline`` sessions, at ``--sessions``, and at ``--baseline`` again (Redis
emptied and refilled: the spread between the two baselines is the box's noise): the latency
of create, step (1 token), GET metadata, GET state and a ``/metrics`` scrape (which counts the
sessions), sequential and interleaved; Redis's own time per script call; Redis
``used_memory`` per session; populate time; and the expiry path: ``--due`` sessions that expire
at once, and how many scrapes (at what cost each) until the count is exact again.

    python -m bench.scale [--sessions 1000000] [--baseline 1000] [--requests 200]
    python -m bench.scale --quick    # 20k vs 1k, into bench/results/quick/
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import redis as redis_py
from prometheus_client.parser import text_string_to_metric_families

from bench import machine, servers
from bench.populate import Template, gone, indexed, populate, template
from service.store.counting import DUE_BATCH, MAX_ROUNDS

RESULTS = Path(__file__).parent / "results"
OPS = ("create", "step", "get", "state", "metrics")
BYTES_PER_SESSION = 6_000  # maxmemory sizing: ~4 KB measured, plus headroom


def sessions_gauge(http: httpx.Client) -> tuple[int, float]:
    """``carryover_sessions`` from one ``/metrics`` scrape, and the scrape's milliseconds."""
    started = time.perf_counter()
    text = http.get("/metrics").raise_for_status().text
    ms = (time.perf_counter() - started) * 1000
    for family in text_string_to_metric_families(text):
        if family.name == "carryover_sessions":
            return int(family.samples[0].value), ms
    raise RuntimeError("/metrics has no carryover_sessions gauge")


def used_memory(raw: redis_py.Redis) -> int:
    return int(raw.info("memory")["used_memory"])


def measure(http: httpx.Client, ids: list[str], requests: int, rng: random.Random) -> dict[str, list[float]]:
    """``requests`` of each operation, interleaved (so load on the box hits them alike), each on
    a session drawn from ``ids``; milliseconds per request, after a few unmeasured ones."""
    warmup = 5
    ms: dict[str, list[float]] = {op: [] for op in OPS}
    for i in range(warmup + requests):
        stepped, read = rng.choice(ids), rng.choice(ids)
        step_body = {"inputs": {"tokens": [rng.randrange(64)]}}
        for op in OPS:
            started = time.perf_counter()
            if op == "create":
                reply = http.post("/v1/sessions", json={})
            elif op == "step":
                reply = http.post(f"/v1/sessions/{stepped}/step", json=step_body)
            elif op == "get":
                reply = http.get(f"/v1/sessions/{read}")
            elif op == "state":
                reply = http.get(f"/v1/sessions/{read}/state")
            else:
                reply = http.get("/metrics")
            elapsed = (time.perf_counter() - started) * 1000
            if reply.status_code not in (200, 201):
                raise RuntimeError(f"{op}: {reply.status_code} {reply.text[:300]}")
            if i >= warmup:
                ms[op].append(elapsed)
    return ms


def stats(ms: list[float]) -> dict[str, float]:
    q = statistics.quantiles(ms, n=100, method="inclusive") if len(ms) > 1 else ms * 99
    return {
        "p50_ms": round(q[49], 3),
        "p95_ms": round(q[94], 3),
        "p99_ms": round(q[98], 3),
        "max_ms": round(max(ms), 3),
        "mean_ms": round(statistics.fmean(ms), 3),
    }


def check_copies(http: httpx.Client, tpl: Template, copy: str) -> None:
    """A copy steps like the session it was copied from (same state: same outputs) and reads back."""
    body = {"inputs": {"tokens": [9]}}
    a = http.post(f"/v1/sessions/{tpl.session_id}/step", json=body).raise_for_status().json()
    b = http.post(f"/v1/sessions/{copy}/step", json=body).raise_for_status().json()
    if a["outputs"] != b["outputs"] or b["step"] != tpl.step + 1:
        raise RuntimeError("a populated session does not step like the session it was copied from")
    if http.get(f"/v1/sessions/{copy}").raise_for_status().json()["step"] != tpl.step + 1:
        raise RuntimeError("a populated session's step did not read back")


def expiry(http: httpx.Client, raw: redis_py.Redis, tpl: Template, due: int, live: int) -> dict[str, Any]:
    """``due`` sessions expire at once; scrape ``/metrics`` until the gauge is ``live`` again."""
    ids, _ = populate(raw, tpl, due, ttl_ms=1500)
    deadline = time.monotonic() + 60
    while not gone(raw, ids) and time.monotonic() < deadline:
        time.sleep(0.2)
    scrapes: list[float] = []
    count = -1
    while count != live and len(scrapes) < 4 * (due // (DUE_BATCH * MAX_ROUNDS) + 2):
        count, ms = sessions_gauge(http)
        scrapes.append(ms)
    return {
        "due": due,
        "live": live,
        "scrapes_until_exact": len(scrapes) if count == live else None,
        "scrape_ms": [round(s, 2) for s in scrapes],
        "index_after": indexed(raw)[0],
    }


def level(
    http: httpx.Client, raw: redis_py.Redis, tpl: Template, ids: list[str], target: int, args: argparse.Namespace
) -> dict[str, Any]:
    """Populate up to ``target`` sessions, check the service counts them, measure."""
    more, seconds = populate(raw, tpl, max(0, target - indexed(raw)[0]), batch=args.batch)
    ids += more
    expected = indexed(raw)[0]
    gauge, _ = sessions_gauge(http)
    if gauge != expected or indexed(raw)[1] != expected:
        raise RuntimeError(f"the service counts {gauge} sessions, the index {indexed(raw)}, expected {expected}")
    point: dict[str, Any] = {
        "sessions": gauge,
        "populated": len(more),
        "populate_s": round(seconds, 2),
        "populate_per_s": round(len(more) / seconds) if more else None,
        "used_memory": used_memory(raw),
    }
    raw.config_resetstat()  # Redis's own time per command, for this level's requests only
    point["latency"] = {op: stats(ms) for op, ms in measure(http, ids, args.requests, random.Random(target)).items()}
    evalsha = raw.info("commandstats").get("cmdstat_evalsha", {})
    point["redis_usec_per_script_call"] = float(evalsha.get("usec_per_call", 0.0))
    live, _ = sessions_gauge(http)
    point["expiry"] = expiry(http, raw, tpl, args.due, live)
    return point


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Baseline, big, baseline again (after emptying Redis): the second baseline says how much
    of a difference the box's own drift makes."""
    maxmemory = max(1 << 30, (args.sessions + 4 * args.requests + args.due) * BYTES_PER_SESSION)
    redis_flags = ["--maxmemory", str(maxmemory), "--maxmemory-policy", "noeviction", "--rdbcompression", "no"]
    serve_flags = ["--max-sessions", str(2 * (args.sessions + args.due) + 10 * args.requests + 100)]
    with tempfile.TemporaryDirectory() as tmp, servers.redis(Path(tmp), *redis_flags) as rs:
        raw = redis_py.Redis.from_url(rs.url, socket_timeout=300)
        try:
            with (
                servers.carryover(rs.url, *serve_flags) as server,
                httpx.Client(base_url=server.url, timeout=60) as http,
            ):
                tpl = template(http, raw)
                empty = used_memory(raw)
                record_bytes = int(raw.memory_usage(f"carryover:{{{tpl.session_id}}}:s", samples=0) or 0)
                [copy], _ = populate(raw, tpl, 1)
                check_copies(http, tpl, copy)  # before any measurement steps either of them
                ids = [tpl.session_id, copy]
                base = level(http, raw, tpl, ids, args.baseline, args)
                big = level(http, raw, tpl, ids, args.sessions, args)
                per_session = (big["used_memory"] - base["used_memory"]) / max(1, big["sessions"] - base["sessions"])
                index_bytes = int(raw.memory_usage("carryover:{index}:expiry", samples=0) or 0)
                flushed = time.perf_counter()
                # ASYNC frees in Redis's background thread; wait until it is done, so the next
                # level is not measured beside it. The scripts stay loaded (SCRIPT FLUSH is another command).
                raw.flushall(asynchronous=True)
                while int(raw.info("memory").get("lazyfree_pending_objects", 0)):
                    time.sleep(0.1)
                flush_s = time.perf_counter() - flushed
                ids.clear()
                again = level(http, raw, tpl, ids, args.baseline, args)
                return {
                    "benchmark": "scale",
                    "machine": machine.describe(),
                    "setup": {"requests": args.requests, "baseline": args.baseline, "sessions": args.sessions},
                    "record": {
                        "template_ttl_s": round(tpl.ttl_ms / 1000),
                        "record_bytes": record_bytes,
                        "used_memory_per_session": round(per_session),
                        "index_bytes_per_session": round(index_bytes / big["sessions"]),
                        "used_memory_empty": empty,
                        "flushall_s": round(flush_s, 2),
                    },
                    "levels": [base, big, again],
                    "ratios": ratios(base, big, again),
                }
        finally:
            raw.close()


def ratios(base: dict[str, Any], big: dict[str, Any], again: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per operation: ``big`` over the mean of the two baselines, and the noise: the second
    baseline over the first."""
    out = {}
    for op in OPS:
        b1, n, b2 = base["latency"][op], big["latency"][op], again["latency"][op]
        out[op] = {
            "p50": round(n["p50_ms"] / ((b1["p50_ms"] + b2["p50_ms"]) / 2), 2),
            "p99": round(n["p99_ms"] / ((b1["p99_ms"] + b2["p99_ms"]) / 2), 2),
            "noise_p50": round(b2["p50_ms"] / b1["p50_ms"], 2),
            "noise_p99": round(b2["p99_ms"] / b1["p99_ms"], 2),
        }
    return out


def table(result: dict[str, Any]) -> str:
    base, big, again = result["levels"]
    rec, m = result["record"], result["machine"]
    n0, n1 = f"{base['sessions']:,}", f"{big['sessions']:,}"
    lines = [
        f"{n1} vs {n0} idle sessions of the bundled LM, {result['setup']['requests']} sequential requests per "
        f"operation, measured at {n0}, then {n1}, then {n0} again; {m.get('cpus', '?')} CPUs, load average "
        f"{', '.join(f'{x:.1f}' for x in m.get('load_average', ()))} at the end.",
        "",
        f"| operation | p50 / p99 at {n0} | at {n1} | at {n0} again | {n1} / mean of {n0}, p50 | p99 "
        f"| {n0} again / first, p50 | p99 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for op in OPS:
        b, n, a, r = base["latency"][op], big["latency"][op], again["latency"][op], result["ratios"][op]
        cells = [f"{x['p50_ms']:.2f} / {x['p99_ms']:.2f} ms" for x in (b, n, a)]
        lines.append(
            f"| {op} | {' | '.join(cells)} | **{r['p50']:.2f}×** | {r['p99']:.2f}× "
            f"| {r['noise_p50']:.2f}× | {r['noise_p99']:.2f}× |"
        )
    redis_us = " / ".join(f"{lvl['redis_usec_per_script_call']:.1f}" for lvl in (base, big, again))
    e0, e1 = base["expiry"], big["expiry"]
    lines += [
        "",
        f"- Redis's own time per script call (`INFO commandstats`, EVALSHA), {n0} / {n1} / {n0}: {redis_us} µs.",
        f"- Memory: {rec['used_memory_per_session']:,} B of `used_memory` per session ({rec['record_bytes']:,} B "
        f"`MEMORY USAGE` of one record, {rec['index_bytes_per_session']} B of the counting index). TTL "
        f"{rec['template_ttl_s']:,} s, refreshed on every access.",
        f"- Populate: {big['populated']:,} sessions in {big['populate_s']:.1f} s ({big['populate_per_s']:,}/s), "
        f"pipelined RESTORE; FLUSHALL of them: {rec['flushall_s']:.1f} s.",
        f"- Expiry: {e1['due']:,} sessions expiring at once were uncounted after {e1['scrapes_until_exact']} "
        f"`/metrics` scrapes at {n1} (slowest {max(e1['scrape_ms']):.0f} ms) and {e0['scrapes_until_exact']} at "
        f"{n0} (slowest {max(e0['scrape_ms']):.0f} ms).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sessions", type=int, default=1_000_000, help="idle sessions at the big level")
    p.add_argument("--baseline", type=int, default=1000, help="idle sessions at the small level")
    p.add_argument("--requests", type=int, default=200, help="measured requests per operation and level")
    p.add_argument("--due", type=int, default=8000, help="sessions that expire at once, per level")
    p.add_argument("--batch", type=int, default=1000, help="sessions per populate round trip")
    p.add_argument("--quick", action="store_true", help="20k vs 1k, 50 requests, into bench/results/quick/")
    p.add_argument("--results", type=Path, default=None, help="folder for scale.json / scale.md / scale.png")
    args = p.parse_args(argv)
    if args.quick:
        args.sessions, args.requests, args.due = 20_000, 50, 2000
    if not 1 < args.baseline < args.sessions:
        p.error("need 1 < --baseline < --sessions")
    results = args.results or (RESULTS / "quick" if args.quick else RESULTS)
    results.mkdir(parents=True, exist_ok=True)
    result = run(args)
    (results / "scale.json").write_text(json.dumps(result, indent=2) + "\n")
    text = table(result)
    (results / "scale.md").write_text(text + "\n")
    from bench.plots import scale_plot  # matplotlib only once there is something to draw

    scale_plot(result, results / "scale.png")
    print(text)
    print(f"wrote {results}/scale.json, scale.md, scale.png")


if __name__ == "__main__":
    main()
