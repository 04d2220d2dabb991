"""Redis memory per session (``MEMORY USAGE``) after one request of each size, on the bundled LM.

Starts a private Redis and ``carryover serve`` (``--repo`` runs another checkout's service, e.g.
the one before a change), creates one session per request size, steps it once with ``step``
(so a replay copy may be kept) and prints the bytes of the session's hash and of its replay key,
then again after the replay window. ``python -m bench.memory [--repo DIR] [--sizes 1 2048]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import httpx
import orjson
import redis as redis_py

from bench import servers

STATE_BYTES = 2 * 256 * 4  # the bundled LM's h0: 2 layers x 256 float32


def usage(raw: redis_py.Redis, session_id: str) -> tuple[int, int]:
    """``MEMORY USAGE`` (bytes, 0 when absent) of the session's hash and of its replay key."""
    hash_b = raw.memory_usage(f"carryover:{{{session_id}}}:s", samples=0) or 0
    replay_b = raw.memory_usage(f"carryover:{{{session_id}}}:r", samples=0) or 0
    return int(hash_b), int(replay_b)


def main(argv: list[str] | None = None) -> None:
    """Print one table row per request size: hash bytes, replay-key bytes, both after the window."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", type=Path, default=servers.ROOT, help="checkout whose service to run")
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 64, 256, 2048])
    p.add_argument("--window", type=float, default=2.0, help="--replay-window-s given to the server")
    args = p.parse_args(argv)
    extra = ["--max-steps-per-request", "16384"]
    if (args.repo / "service" / "config.py").read_text().count("replay_window_s"):
        extra += ["--replay-window-s", str(args.window)]
    with tempfile.TemporaryDirectory() as tmp, servers.redis(Path(tmp)) as rs:
        time.sleep(0.5)
        server = servers.carryover(rs.url, *extra)
        # Import the service from --repo (first on sys.path), not from the bench's own checkout.
        repo = str(args.repo.resolve())
        run = f"import runpy, sys; sys.path.insert(0, {repo!r}); runpy.run_module('service', run_name='__main__')"
        server.argv[1:3] = ["-c", run]  # was "-m service"
        with server:
            raw = redis_py.Redis.from_url(rs.url)
            rows = []
            with httpx.Client(base_url=server.url, timeout=120) as c:
                for t in args.sizes:
                    sid = c.post("/v1/sessions", json={}).json()["session_id"]
                    created = usage(raw, sid)[0]
                    body = orjson.dumps({"inputs": {"tokens": [i % 64 for i in range(t)]}, "step": 0})
                    r = c.post(f"/v1/sessions/{sid}/step", content=body, headers={"content-type": "application/json"})
                    r.raise_for_status()
                    rows.append((t, sid, created, *usage(raw, sid)))
                time.sleep(args.window + 0.5)
                print(f"repo {args.repo}; state {STATE_BYTES} B; replay window {args.window} s")
                print("| T of the request | hash, created | hash after | replay key | after the window (both) |")
                print("|---|---|---|---|---|")
                for t, sid, created, h, rk in rows:
                    h2, r2 = usage(raw, sid)
                    print(f"| {t} | {created:,} B | {h:,} B | {rk:,} B | {h2 + r2:,} B |")


if __name__ == "__main__":
    main()
