"""The two Dockerfiles: hadolint-clean, multi-stage, non-root, health-checked on /readyz, no
torch and no compilers in what ships; the CUDA base matches what onnxruntime-gpu is built for."""

from __future__ import annotations

import json
import re
import subprocess
from importlib import metadata
from pathlib import Path

import pytest

from tests.deploy.files import DOCKERFILE, DOCKERFILE_CUDA, HEALTHCHECK, ROOT, dockerfile_stages, tool

IMAGES = pytest.mark.parametrize("path", [DOCKERFILE, DOCKERFILE_CUDA], ids=["cpu", "cuda"])
COMPILERS = re.compile(r"\b(gcc|g\+\+|clang|build-essential|cmake|python3?-dev|[a-z0-9.+-]+-dev)\b")


def args_of(stage: list[tuple[str, str]], instruction: str) -> list[str]:
    return [a for i, a in stage if i == instruction]


def build_args(path: Path) -> dict[str, str]:
    """ARG defaults declared before the first FROM."""
    return dict(a.split("=", 1) for a in args_of(dockerfile_stages(path)[0], "ARG") if "=" in a)


@IMAGES
def test_hadolint_finds_nothing(path: Path) -> None:
    result = subprocess.run(
        [tool("hadolint"), "--no-color", str(path)], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr


@IMAGES
def test_final_stage_is_lean_non_root_and_health_checked(path: Path) -> None:
    stages = dockerfile_stages(path)[1:]
    assert len(stages) >= 2, "multi-stage: the build stage's tools stay out of the image"
    final = stages[-1]
    (user,) = args_of(final, "USER")
    assert user.split(":")[0] not in ("root", "0")
    (healthcheck,) = args_of(final, "HEALTHCHECK")
    assert healthcheck.endswith('CMD ["python", "/opt/carryover/healthcheck.py"]')
    assert "/readyz" in HEALTHCHECK.read_text()
    assert "COPY --from=build /opt/carryover /opt/carryover" in [f"COPY {a}" for a in args_of(final, "COPY")]
    (entrypoint,) = args_of(final, "ENTRYPOINT")
    assert json.loads(entrypoint) == ["carryover", "serve", "--host", "0.0.0.0"]
    env = " ".join(args_of(final, "ENV"))
    assert "CARRYOVER_PORT=8000" in env and "/opt/carryover/bin" in env
    for run in args_of(final, "RUN"):
        assert not COMPILERS.search(run), f"a compiler or -dev package in the final stage: {run}"
        assert "pip install" not in run


@IMAGES
def test_runtime_install_without_torch(path: Path) -> None:
    installs = [r for stage in dockerfile_stages(path) for r in args_of(stage, "RUN") if "pip install" in r]
    assert installs, "the build stage installs carryover"
    for run in installs:
        assert "torch" not in run and "[" not in run, f"extras (torch) in the image: {run}"
        assert " -e " not in f" {run} ", "a regular install: the venv must stand alone"
    build = dockerfile_stages(path)[1]
    copied = " ".join(args_of(build, "COPY"))
    # The bundled model is package data of `service`, installed with it.
    assert "service ./service" in copied and "pyproject.toml" in copied


def test_cuda_base_matches_onnxruntime_gpu() -> None:
    """ORT's CUDA builds load only their own CUDA and cuDNN majors: the base image must have them."""
    image = build_args(DOCKERFILE_CUDA)["CUDA_IMAGE"]
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.\d+\.\d+-cudnn(\d*)-runtime-ubuntu[\d.]+", image)
    assert match, f"expected an NVIDIA CUDA runtime + cuDNN image, got {image}"
    requires = metadata.requires("onnxruntime-gpu") or []
    cuda = next(r for r in requires if r.startswith("nvidia-cuda-runtime"))
    cudnn = next(r for r in requires if r.startswith("nvidia-cudnn"))
    cuda_major = re.search(r"~=\s*(\d+)", cuda)
    cudnn_major = re.search(r"~=\s*(\d+)", cudnn)
    assert cuda_major and cudnn_major
    assert match.group(1) == cuda_major.group(1), f"{image} vs onnxruntime-gpu's {cuda}"
    # CUDA 13 images ship cuDNN 9 only; older tags may name the major (cudnn9).
    assert match.group(2) in ("", cudnn_major.group(1)), f"{image} vs onnxruntime-gpu's {cudnn}"
    assert cudnn_major.group(1) == "9"
    assert re.fullmatch(r"\d+\.\d+\.\d+", build_args(DOCKERFILE_CUDA)["ORT_VERSION"])


def test_dockerignore_keeps_the_context_small_but_complete() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", "data"} <= ignored
    needed = {"service", "model_export", "pyproject.toml", "README.md", "docker", "docker/healthcheck.py"}
    assert not needed & ignored
