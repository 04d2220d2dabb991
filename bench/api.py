"""HTTP and WebSocket throughput at N concurrent clients against a real ``carryover serve``.

    python -m bench.api [--clients 64] [--seconds 10] [--steps 4]

Starts ``carryover serve`` (bundled char LM, embedded Redis) in a subprocess on a free port;
each of ``--clients`` clients owns one session and sends its next request as soon as the last
is answered (closed loop), over HTTP (``POST .../step`` with ``step`` for exactly-once) and then
over one WebSocket per client (JSON chunks, one in flight). The load generator shares the
machine with the server, so absolute numbers are pessimistic; they come from one run.
Writes ``bench/results/api.json`` and ``bench/results/api.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
from websockets.asyncio.client import connect

RESULTS = Path(__file__).parent / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(data_dir: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--port", str(port), "--data-dir", data_dir],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


def summary(latencies: list[float], seconds: float) -> dict[str, float]:
    lat = np.array(latencies) * 1000
    return {
        "requests_per_s": round(len(lat) / seconds, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 2),
        "p99_ms": round(float(np.percentile(lat, 99)), 2),
        "requests": len(lat),
    }


async def http_load(url: str, clients: int, seconds: float, steps: int) -> dict[str, float]:
    """Keep-alive HTTP/1.1 on raw asyncio streams: httpx's connection pool costs more CPU than
    the server at this rate (it measured ~250 requests/s here), and the load generator shares
    the machine with the server."""
    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        ids = [(await http.post("/v1/sessions", json={})).json()["session_id"] for _ in range(clients)]
    host, port = url.removeprefix("http://").split(":")
    deadline = time.monotonic() + seconds

    async def client(sid: str, seed: int) -> None:
        rng = np.random.default_rng(seed)
        reader, writer = await asyncio.open_connection(host, int(port))
        step = 0
        while time.monotonic() < deadline:
            body = orjson.dumps({"inputs": {"tokens": rng.integers(0, 90, steps).tolist()}, "step": step})
            head = (
                f"POST /v1/sessions/{sid}/step HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode()
            started = time.perf_counter()
            writer.write(head + body)
            status, length = _parse_head(await reader.readuntil(b"\r\n\r\n"))
            reply = await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            if status != 200:
                raise RuntimeError(f"HTTP {status}: {reply[:300]!r}")
            step = orjson.loads(reply)["step"]
        writer.close()

    started = time.monotonic()
    await asyncio.gather(*(client(s, i) for i, s in enumerate(ids)))
    return summary(latencies, time.monotonic() - started)


def _parse_head(head: bytes) -> tuple[int, int]:
    lines = head.split(b"\r\n")
    length = next(int(line.split(b":")[1]) for line in lines if line.lower().startswith(b"content-length:"))
    return int(lines[0].split()[1]), length


async def ws_load(url: str, clients: int, seconds: float, steps: int) -> dict[str, float]:
    latencies: list[float] = []
    ws_url = url.replace("http://", "ws://") + "/v1/stream"
    deadline = time.monotonic() + seconds

    async def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        async with connect(ws_url, max_size=None) as ws:
            await ws.recv()  # {"type": "session", ...}
            while time.monotonic() < deadline:
                body = orjson.dumps({"inputs": {"tokens": rng.integers(0, 90, steps).tolist()}})
                started = time.perf_counter()
                await ws.send(body.decode())
                reply = orjson.loads(await ws.recv())
                latencies.append(time.perf_counter() - started)
                if reply.get("type") != "result":
                    raise RuntimeError(f"unexpected reply {reply}")

    started = time.monotonic()
    await asyncio.gather(*(client(i) for i in range(clients)))
    return summary(latencies, time.monotonic() - started)


def write(result: dict[str, Any], results: Path = RESULTS) -> None:
    results.mkdir(parents=True, exist_ok=True)
    (results / "api.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = "\n".join(
        f"| {name} | {r['requests_per_s']:,} | {r['requests_per_s'] * result['steps']:,.0f} "
        f"| {r['p50_ms']} | {r['p99_ms']} |"
        for name, r in (("HTTP", result["http"]), ("WebSocket", result["ws"]))
    )
    (results / "api.md").write_text(
        f"{result['clients']} concurrent clients, {result['steps']} tokens per request, bundled char LM, embedded "
        f"Redis; load generator on the same {os.cpu_count()}-CPU machine.\n\n"
        "| transport | requests/s | timesteps/s | p50 ms | p99 ms |\n|---|---|---|---|---|\n" + rows + "\n"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=RESULTS, help="where the JSON, table and plot go")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--steps", type=int, default=4)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="carryover-bench-") as tmp:
        proc, url = start_server(tmp)
        try:
            result = {
                "clients": args.clients,
                "steps": args.steps,
                "http": asyncio.run(http_load(url, args.clients, args.seconds, args.steps)),
                "ws": asyncio.run(ws_load(url, args.clients, args.seconds, args.steps)),
            }
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    write(result, args.results)
    from bench.plots import plot_all

    plot_all(args.results)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
