"""The committed ONNX test models under ``tests/data/models/``, and the one script that regenerates them.

The server and API tests (``tests/service/``) run from these files, so they need no PyTorch. Each
spec of ``tests/models.py`` is there in both forms of the contract, ``NAME.onnx`` (sequence) and
``NAME_step.onnx`` (step), exported from one trace with the same seeds and weights as the
exporter's own tests use. Regenerate them after changing ``tests/models.py`` or ``model_export/``
(needs the ``export`` extra, i.e. PyTorch)::

    .venv/bin/python -m tests.make_models

``tests/model_export/test_committed_models.py`` exports the specs again and fails while the
committed files are stale. Importing this module does not import torch; only ``export_models``
does.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent / "data" / "models"
STEP_SUFFIX = "_step"


@dataclass(frozen=True)
class Exported:
    """One test model in both forms: the sequence-form and step-form ``.onnx`` files."""

    name: str
    sequence: Path
    step: Path


def _paths(root: Path, name: str) -> Exported:
    return Exported(name, root / f"{name}.onnx", root / f"{name}{STEP_SUFFIX}.onnx")


# Example models of ``model_export/examples`` committed beside the specs, for the server tests of
# what the specs lack (per-session constants): name -> the module whose ``export_forms`` writes both.
EXAMPLES = {"attention_decoder": "model_export.examples.attention_decoder"}


def committed_models(root: Path = MODELS_DIR) -> dict[str, Exported]:
    """The committed test models keyed by spec name (no torch needed; the examples are apart)."""
    names = sorted(p.stem for p in root.glob("*.onnx") if not p.stem.endswith(STEP_SUFFIX) and p.stem not in EXAMPLES)
    return {name: _paths(root, name) for name in names}


def committed_example(name: str, root: Path = MODELS_DIR) -> Exported:
    """A committed example model (one of ``EXAMPLES``), both forms."""
    return _paths(root, name)


def export_example(name: str, root: Path) -> Exported:
    """Export one of ``EXAMPLES`` into ``root`` (needs torch)."""
    paths = _paths(root, name)
    importlib.import_module(EXAMPLES[name]).export_forms(paths.sequence, paths.step)
    return paths


def export_models(root: Path) -> dict[str, Exported]:
    """Export every spec of ``tests/models.py`` into ``root``, both forms from one trace (needs torch)."""
    from model_export.export import export_both
    from tests.models import SPECS, build

    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in SPECS:
        paths = _paths(root, name)
        export_both(build(name), paths.sequence, paths.step)
        out[name] = paths
    return out


def main() -> int:
    """Rewrite ``tests/data/models/`` from ``tests/models.py`` (stale files of removed specs go too)."""
    for stale in MODELS_DIR.glob("*.onnx"):
        stale.unlink()
    for e in [*export_models(MODELS_DIR).values(), *(export_example(name, MODELS_DIR) for name in EXAMPLES)]:
        print(f"wrote {e.sequence} and {e.step}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
