"""A description of the machine a benchmark ran on, for its results JSON."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import onnxruntime as ort

from service.store.embedded import find_redis_server, server_version


def _first(path: str, key: str) -> str | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
            cwd=Path(__file__).resolve().parent,
        )
    except OSError:
        return None
    return out.stdout.strip() or None


def describe() -> dict[str, Any]:
    """CPU, memory, OS, Python, ONNX Runtime, Redis and the code's commit."""
    return {
        "cpu": _first("/proc/cpuinfo", "model name") or platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "memory": _first("/proc/meminfo", "MemTotal"),
        "os": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "ort_providers": ort.get_available_providers(),
        "redis_server": ".".join(map(str, server_version(find_redis_server()))),
        "load_average": os.getloadavg(),
        "commit": _git_commit(),
    }
