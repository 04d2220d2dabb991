"""Which ONNX Runtime execution providers a model runs on: aliases and the CUDA probe."""

from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path

import onnxruntime as ort

log = logging.getLogger(__name__)

PROVIDER_ALIASES = {
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


@functools.cache
def cuda_library_error() -> str | None:
    """Why ORT's CUDA provider library cannot load here (None if it can).

    ``get_available_providers()`` lists CUDA whenever onnxruntime-gpu is installed, even with no
    GPU or CUDA libraries; loading the provider library first tells the truth without ORT's
    noisy failure log. ``get_providers()`` on the created session still has the last word.
    """
    library = Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    try:
        ctypes.CDLL(str(library))
    except OSError as e:
        return str(e)
    return None


def resolve_providers(requested: list[str] | None) -> list[str]:
    """Requested names (aliases ``cuda``/``cpu``/``tensorrt`` allowed), or CUDA-then-CPU when CUDA is usable."""
    if requested:
        return [PROVIDER_ALIASES.get(p.lower(), p) for p in requested]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        reason = cuda_library_error()
        if reason is None:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        log.info("CUDA execution provider not usable (%s); using CPU", reason)
    return ["CPUExecutionProvider"]
