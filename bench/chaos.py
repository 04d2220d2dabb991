"""Chaos run, bounded in time: load on two replicas while Redis and one replica are killed
(SIGKILL) and restarted, then every session checked against the offline reference.

    python -m bench.chaos --seconds 60 --sessions 16 [--interval 6] [--out bench/results/chaos.json]

Redis runs with AOF ``appendfsync always``, so a write it acknowledged survives its kill. Each
session is a client that sends its chunks in order with ``step`` (exactly once) to either
replica, and on a 503/507, a connection error or a timeout sends the same chunk again, to the
other replica (what a load balancer would do): the reply is then the chunk applied, or the
replay of the one already applied. At the end each session's acknowledged outputs and its
stored state must equal one unpadded run of its whole input sequence. The outcome (statuses
seen, the longest wait for an answer, recoveries, sessions checked) is printed as JSON and
written to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.servers import ROOT, Server, carryover, free_port
from model_export.verify import random_inputs, unpadded_run
from service.engine.model import RecurrentModel
from service.store.embedded import find_redis_server

RETRYABLE = frozenset({502, 503, 504, 507})
DEFAULT_MODEL = ROOT / "tests" / "data" / "models" / "gru_stacked.onnx"
RESULTS = ROOT / "bench" / "results" / "chaos.json"


@dataclass
class Stats:
    """What the clients saw: replies by status, transport failures, the longest single wait."""

    statuses: Counter[int] = field(default_factory=Counter)
    transport_errors: int = 0
    longest_wait_s: float = 0.0
    retried_chunks: int = 0

    def summary(self) -> dict[str, Any]:
        return {
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "transport_errors": self.transport_errors,
            "longest_wait_s": round(self.longest_wait_s, 3),
            "retried_chunks": self.retried_chunks,
            "server_errors": sum(v for k, v in self.statuses.items() if k >= 500 and k not in RETRYABLE),
        }


class StepRefused(Exception):
    """A reply that no retry can fix (a 4xx or a 500): the run failed."""


async def step_exactly_once(
    http: httpx.AsyncClient,
    urls: list[str],
    session_id: str,
    inputs: dict[str, np.ndarray],
    step: int,
    stats: Stats,
    give_up_s: float = 120.0,
) -> dict[str, np.ndarray]:
    """Apply one chunk exactly once: send it with ``step``, and after an outage resend the same
    chunk (to the next of ``urls``) until it is answered (applied, or the replay of the applied
    one). Returns its outputs."""
    body = json.dumps({"inputs": {k: v.tolist() for k, v in inputs.items()}, "step": step})
    deadline = time.monotonic() + give_up_s
    for attempt in range(10_000):
        url = urls[(step + attempt) % len(urls)]
        started = time.monotonic()
        try:
            r = await http.post(f"{url}/v1/sessions/{session_id}/step", content=body)
        except httpx.TransportError:
            stats.transport_errors += 1
            status, wait = 0, 0.2
        else:
            status = r.status_code
            stats.statuses[status] += 1
            if status == 200:
                stats.retried_chunks += attempt > 0
                stats.longest_wait_s = max(stats.longest_wait_s, time.monotonic() - started)
                return {k: np.asarray(v, np.float32) for k, v in r.json()["outputs"].items()}
            if status not in RETRYABLE:
                raise StepRefused(f"{session_id} step {step}: {status} {r.text[:300]}")
            wait = min(float(r.headers.get("retry-after", "1")), 0.5)
        stats.longest_wait_s = max(stats.longest_wait_s, time.monotonic() - started)
        if time.monotonic() > deadline:
            raise StepRefused(f"{session_id} step {step}: no answer within {give_up_s} s (last status {status})")
        await asyncio.sleep(wait)
    raise StepRefused(f"{session_id} step {step}: too many attempts")


async def create_session(http: httpx.AsyncClient, urls: list[str], stats: Stats) -> str:
    """A new session on whichever replica answers (creates are retried too: nothing to replay)."""
    for attempt in range(600):
        try:
            r = await http.post(f"{urls[attempt % len(urls)]}/v1/sessions", json={})
            stats.statuses[r.status_code] += 1
            if r.status_code == 201:
                return str(r.json()["session_id"])
            if r.status_code not in RETRYABLE:
                raise StepRefused(f"create: {r.status_code} {r.text[:300]}")
        except httpx.TransportError:
            stats.transport_errors += 1
        await asyncio.sleep(0.2)
    raise StepRefused("create: no replica answered")


@dataclass
class SessionRun:
    """One session's inputs, sent chunk by chunk, and the outputs acknowledged for them."""

    session_id: str
    chunks: list[dict[str, np.ndarray]]
    outputs: list[dict[str, np.ndarray]] = field(default_factory=list)

    def sent(self) -> dict[str, np.ndarray]:
        done = self.chunks[: len(self.outputs)]
        return {k: np.concatenate([c[k] for c in done]) for k in done[0]} if done else {}


def check_against_reference(model: RecurrentModel, run: SessionRun, state: dict[str, np.ndarray]) -> None:
    """The session's acknowledged outputs and stored state equal one unpadded run of its inputs."""
    inputs = run.sent()
    steps = next(iter(inputs.values())).shape[0]
    if int(state["carryover_step"]) != steps:
        raise AssertionError(f"{run.session_id}: stored step {int(state['carryover_step'])}, acknowledged {steps}")
    ref_out, ref_state = unpadded_run(model, inputs)
    for name, ref in ref_out.items():
        got = np.concatenate([o[name] for o in run.outputs])
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0, err_msg=f"{run.session_id} output {name}")
    for name, ref in ref_state.items():
        np.testing.assert_allclose(state[name], ref, atol=1e-4, rtol=0, err_msg=f"{run.session_id} state {name}")


async def stored_state(http: httpx.AsyncClient, url: str, session_id: str) -> dict[str, np.ndarray]:
    r = await http.get(f"{url}/v1/sessions/{session_id}/state")
    r.raise_for_status()
    archive = np.load(io.BytesIO(r.content), allow_pickle=False)
    return {k: archive[k] for k in archive.files}


# -- the processes --------------------------------------------------------------------------------
def redis_aof(directory: Path, port: int) -> Server:
    """redis-server with AOF ``always`` on ``port`` (kept across restarts, so clients reconnect)."""
    argv = [find_redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(directory)]
    argv += ["--appendonly", "yes", "--appendfsync", "always", "--daemonize", "no"]
    return Server(argv, f"redis://127.0.0.1:{port}/0", ready=None, name="redis-server")


def kill(server: Server) -> None:
    """SIGKILL the server's process group, as in a crash."""
    if server.proc is not None and server.proc.poll() is None:
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait(10)
    server.proc = None


async def chaos(
    redis: Server, victim: Server, interval_s: float, stop: asyncio.Event, log: list[dict[str, Any]]
) -> None:
    """Every ``interval_s``: kill Redis, or the victim replica, in turn; restart it a moment later."""
    loop = asyncio.get_running_loop()
    turn = 0
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), interval_s)
            return
        except TimeoutError:
            pass
        target = (redis, victim)[turn % 2]
        turn += 1
        started = time.monotonic()
        kill(target)
        await asyncio.sleep(random.uniform(0.5, 1.5))
        await loop.run_in_executor(None, target.start)
        await loop.run_in_executor(None, target.wait_ready)
        log.append({"killed": target.name, "down_s": round(time.monotonic() - started, 2)})


async def run_chaos(args: argparse.Namespace) -> dict[str, Any]:
    model = RecurrentModel(args.model, name="chaos")
    rng = np.random.default_rng(args.seed)
    data = Path(tempfile.mkdtemp(prefix="carryover-chaos-"))
    redis = redis_aof(data, free_port())
    redis.start().wait_ready()
    flags = ("--model", f"chaos={args.model}", "--redis-timeout", "1.0")
    replicas = [carryover(redis.url, *flags), carryover(redis.url, *flags)]
    replicas[1].name = "replica-2"
    for r in replicas:
        r.start()
    for r in replicas:
        r.wait_ready()
    urls = [r.url for r in replicas]
    stats = Stats()
    log: list[dict[str, Any]] = []
    stop = asyncio.Event()
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            runs = [
                SessionRun(
                    await create_session(http, urls, stats),
                    [random_inputs(model.contract, int(rng.integers(1, 9)), rng) for _ in range(10_000)],
                )
                for _ in range(args.sessions)
            ]
            end = time.monotonic() + args.seconds

            async def drive(run: SessionRun) -> None:
                step = 0
                while time.monotonic() < end:
                    chunk = run.chunks[len(run.outputs)]
                    run.outputs.append(await step_exactly_once(http, urls, run.session_id, chunk, step, stats))
                    step += next(iter(chunk.values())).shape[0]

            monkey = asyncio.create_task(chaos(redis, replicas[1], args.interval, stop, log))
            await asyncio.gather(*(drive(r) for r in runs))
            stop.set()
            await monkey
            for r in replicas:  # everything back up before the check
                if r.proc is None:
                    r.start().wait_ready()
            for run in runs:
                check_against_reference(model, run, await stored_state(http, urls[0], run.session_id))
    finally:
        stop.set()
        for r in replicas:
            r.stop()
        redis.stop()
    steps = sum(int(sum(next(iter(c.values())).shape[0] for c in r.chunks[: len(r.outputs)])) for r in runs)
    return {
        "seconds": args.seconds,
        "sessions": args.sessions,
        "sessions_checked": len(runs),
        "chunks_acknowledged": sum(len(r.outputs) for r in runs),
        "steps_acknowledged": steps,
        "faults": log,
        **stats.summary(),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=60.0, help="how long the load runs")
    p.add_argument("--sessions", type=int, default=16)
    p.add_argument("--interval", type=float, default=6.0, help="seconds between faults")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = asyncio.run(run_chaos(args))
    text = json.dumps(result, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    if result["server_errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
