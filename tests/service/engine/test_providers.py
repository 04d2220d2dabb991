"""Provider names: aliases, pass-through, and the CUDA-then-CPU default."""

from __future__ import annotations

import onnxruntime as ort

from service.engine.providers import PROVIDER_ALIASES, cuda_library_error, resolve_providers


def test_aliases_are_case_insensitive_and_unknown_names_pass_through() -> None:
    assert resolve_providers(["cpu"]) == ["CPUExecutionProvider"]
    assert resolve_providers(["CUDA", "cpu"]) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers(["TensorRT"]) == [PROVIDER_ALIASES["tensorrt"]]
    assert resolve_providers(["OpenVINOExecutionProvider"]) == ["OpenVINOExecutionProvider"]


def test_the_default_prefers_cuda_only_when_its_library_loads() -> None:
    default = resolve_providers(None)
    assert default[-1] == "CPUExecutionProvider"
    usable = "CUDAExecutionProvider" in ort.get_available_providers() and cuda_library_error() is None
    assert default == (["CUDAExecutionProvider", "CPUExecutionProvider"] if usable else ["CPUExecutionProvider"])
    assert resolve_providers([]) == default  # an empty list means "not given"


def test_the_cuda_probe_is_cached_and_explains_a_failure() -> None:
    first = cuda_library_error()
    assert cuda_library_error() is first
    assert first is None or (isinstance(first, str) and first)
