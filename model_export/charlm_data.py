"""The demo LM's corpus: Python source files of the standard library of the running Python.

Real data with no download: every ``*.py`` under ``sysconfig``'s ``stdlib`` path, never
``site-packages``. Split BY FILE into train and held-out with a hash of the relative path, so
the split is stable across runs and machines with the same Python version. This module needs
no torch: tests use it to measure the exported model through the runtime.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sysconfig
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HELD_OUT_PERCENT = 5
MIN_CHAR_COUNT = 100
UNK_CHAR = "\ufffd"


@dataclass(frozen=True)
class Corpus:
    train: list[Path]
    held_out: list[Path]


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_held_out(relative: str) -> bool:
    digest = hashlib.sha256(relative.encode()).digest()
    return int.from_bytes(digest[:4], "little") % 100 < HELD_OUT_PERCENT


def split_stdlib(root: Path | None = None) -> Corpus:
    root = root or stdlib_root()
    files = sorted(f for f in root.rglob("*.py") if not {"site-packages", "dist-packages"} & set(f.parts))
    train: list[Path] = []
    held: list[Path] = []
    for f in files:
        (held if is_held_out(f.relative_to(root).as_posix()) else train).append(f)
    return Corpus(train, held)


def package_files(name: str) -> list[Path]:
    """The ``*.py`` files of an installed package (third-party code the model never trained on)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"{name!r} is not an installed package")
    return sorted(f for root in spec.submodule_search_locations for f in Path(root).rglob("*.py"))


def read_text(files: list[Path], limit_chars: int | None = None) -> str:
    parts: list[str] = []
    total = 0
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        total += len(text)
        if limit_chars is not None and total >= limit_chars:
            break
    joined = "\n".join(parts)
    return joined if limit_chars is None else joined[:limit_chars]


def build_vocab(text: str) -> str:
    """Characters seen at least ``MIN_CHAR_COUNT`` times, then the unknown marker (its id is last)."""
    counts = Counter(text)
    chars = sorted(c for c, n in counts.items() if n >= MIN_CHAR_COUNT and c != UNK_CHAR)
    return "".join(chars) + UNK_CHAR


def encode(text: str, vocab: str) -> np.ndarray:
    """Character ids; anything outside the vocab maps to the unknown id (the last one)."""
    index = {c: i for i, c in enumerate(vocab)}
    unk = len(vocab) - 1
    return np.fromiter((index.get(c, unk) for c in text), dtype=np.int64, count=len(text))
