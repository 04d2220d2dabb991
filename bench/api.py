"""HTTP and WebSocket throughput at N concurrent clients against a real ``carryover serve``.

    python -m bench.api [--clients 64] [--seconds 10] [--steps 4]

Starts a private redis-server and ``carryover serve`` (bundled char LM) in subprocesses on free
ports, then runs the load generator (``bench/loadgen.py``) closed loop: each of ``--clients``
clients owns one session and sends its next request as soon as the last is answered, over HTTP
(``POST .../step`` with ``step`` for exactly-once) and then over one WebSocket per client (JSON
chunks, one in flight). The load generator shares the machine with the server, so absolute
numbers are pessimistic; they come from one run. For other servers, transports, open loop or
the whole matrix see ``bench/loadgen.py`` and ``bench/run_all.py``.
Writes ``bench/results/api.json`` and ``bench/results/api.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from bench import servers
from bench.loadgen import LoadConfig, run_load

RESULTS = Path(__file__).parent / "results"


def write(result: dict[str, Any], results: Path = RESULTS) -> None:
    results.mkdir(parents=True, exist_ok=True)
    (results / "api.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = "\n".join(
        f"| {name} | {r['requests_per_s']:,} | {r['steps_per_s']:,.0f} | {r['p50_ms']} | {r['p99_ms']} |"
        for name, r in (("HTTP", result["http"]), ("WebSocket", result["ws"]))
    )
    (results / "api.md").write_text(
        f"{result['clients']} concurrent clients, {result['steps']} tokens per request, bundled char LM, "
        f"private Redis; load generator on the same {os.cpu_count()}-CPU machine.\n\n"
        "| transport | requests/s | timesteps/s | p50 ms | p99 ms |\n|---|---|---|---|---|\n" + rows + "\n"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=RESULTS, help="where the JSON, table and plot go")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--steps", type=int, default=4)
    args = p.parse_args(argv)
    result: dict[str, Any] = {"clients": args.clients, "steps": args.steps}
    tmp = tempfile.TemporaryDirectory(prefix="carryover-bench-")
    with tmp, servers.redis(Path(tmp.name)) as redis, servers.carryover(redis.url) as server:
        for transport in ("http", "ws"):
            config = LoadConfig(
                url=server.url,
                sessions=args.clients,
                chunk=str(args.steps),
                transport=transport,
                duration_s=args.seconds,
                warmup_s=min(1.0, args.seconds / 4),
                exactly_once=True,
                progress=False,
            )
            result[transport] = asyncio.run(run_load(config))
    write(result, args.results)
    from bench.plots import plot_all

    plot_all(args.results)
    print(
        json.dumps(
            {k: v for k, v in result.items() if k not in ("http", "ws")}
            | {
                t: {k: result[t][k] for k in ("requests_per_s", "steps_per_s", "p50_ms", "p99_ms", "errors")}
                for t in ("http", "ws")
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
